"""Training of the small demo models: procedural captioned clips (data.py), the training run (train.py) and the
colour/motion evaluation from decoded frames (evaluate.py)."""
