"""Running the service: the Triton adapter base, chunk scheduling, per-stream state, the tritonserver launcher and `serve`."""
