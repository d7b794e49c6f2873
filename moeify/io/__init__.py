"""Reading and writing checkpoints: validated lazy safetensors shards, streamed shard writing, atomic folders."""
