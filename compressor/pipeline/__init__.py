"""The compress pipeline, the passes and their drivers; compressor/api.py calls them in order.

- inputs.py     the model (streamed or loaded), its dtype and the calibration data (text windows or images)
- pass1.py      the plan: --plan, uniform, or pass 1 (measurements, layer sensitivity) and the budget LP
- pass2.py      pass 2 (GPTQ/RTN per the plan, layer by layer, resumable), then the checkpoint and its reports
- synthetic.py  planning a model too large to load from its config.json alone (meta device, synthetic statistics)
"""
