"""Calibration (issue #12): calibration data, the layer-sequential statistics pass, expert coverage.

``data.calibration_windows`` turns ``--calib [PATH]`` into token windows; ``collect.collect_stats`` runs
them through the runtime's own block code layer by layer and returns per-linear input statistics that the
methods in ``v4convert.quant.methods`` (gptq, awq) consume.
"""

# GPTQ damping, as a fraction of mean(diag H) added to the diagonal. 1.0, not the usual 0.01: with thousands of
# calibration tokens per linear (the recommended 8192 for 7168 input channels) a weakly damped H over-fits the
# calibration windows -- per-linear held-out output error 1.8x the calibration error and a heavy KLD tail; on the
# trained tiny V3 NVFP4, plain gptq 1.032x RTN's mean KLD at 0.01 vs 0.870x at 1.0 (bench/calibration.md).
DEFAULT_GPTQ_DAMP = 1.0
