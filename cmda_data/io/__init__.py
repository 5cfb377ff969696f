"""Files: safetensors tensors with a JSON config, webdataset shards and their codec.

Nothing here executes what it reads: no pickle, no code from a file or a URL.
"""
