"""The Megatron-Core plug-in: tier router, dispatcher, layer spec, model, loss, schedules, metrics, FLOPs."""
