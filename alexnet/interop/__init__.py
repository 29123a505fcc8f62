"""Other people's weights in (Caffe, torchvision), portable formats out (ONNX, safetensors)."""
