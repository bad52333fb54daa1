"""Data: SER corpora, speech-instruction manifests, synthetic emotional speech, grain pipelines.

Submodules are imported on use (`from freezeempath_jax.data import synthetic`), so importing
this package pulls in neither tensorflow-datasets nor grain.
"""
