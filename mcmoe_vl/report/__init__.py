"""Comparative markdown reports built only from saved results files (:func:`mcmoe_vl.report.build.build_report`)."""
