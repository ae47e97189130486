"""Benchmarks of EmoVLM-KD's fused inference and cached training stages (`python -m bench.<script>`)."""
