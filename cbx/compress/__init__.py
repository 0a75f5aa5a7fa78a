"""Compression transforms (``model -> model``, registered by name) and the compressed checkpoint format.

Layout: ``primitives`` (pure tensor math) < ``modules`` (quantized layer swaps on real low-bit
kernels) < ``gptq``/``calibration`` < ``methods`` (registered configs and transforms) <
``checkpoint``; ``registry`` is the name -> transform table the runner uses; ``bench`` is
``cbx bench quant``. Nothing is imported here, so importing the package costs nothing.
"""
