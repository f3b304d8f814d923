"""Engine: device selection and GPU lease, per-job logging, the resumable training loop."""
