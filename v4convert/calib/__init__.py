"""Calibration (issue #12): calibration data, the layer-sequential statistics pass, expert coverage.

``data.calibration_windows`` turns ``--calib [PATH]`` into token windows; ``collect.collect_stats`` runs
them through the runtime's own block code layer by layer and returns per-linear input statistics that the
methods in ``v4convert.quant.methods`` (gptq, awq) consume.
"""
