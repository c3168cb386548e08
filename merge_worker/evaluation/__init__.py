"""Scoring a merge: does each skill survive it? The evaluation datasets (datasets), the model loaded for
scoring, quantized where asked (model_loading), and the retention report (scoring)."""
