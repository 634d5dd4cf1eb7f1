"""Training recipes over the model graph: schedules (layer-wise rates, unfreezing), partial
fine-tuning presets, task heads and multi-task routing, EWC."""
