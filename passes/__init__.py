"""drpc's passes; importing this package registers every one of them with the pass manager."""

from passes import cleanup, convert_fp16, convert_opset, fold_constants, fuse_conv_bn, fuse_matmul_add, fuse_pad_conv  # noqa: F401
