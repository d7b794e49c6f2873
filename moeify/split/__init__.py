"""The split stage: a dense checkpoint becomes a stock MoE checkpoint, one layer at a time.

`convert` owns the run (plan, stream, write); `calibrate` steps the dense model layer by layer over
calibration text; `moe_layer` holds the in-memory form of a split FFN; `methods/` decides how neurons
become experts (clustering, routers and repair live there, with the one method that uses them).
"""
