"""drpc's passes; importing this package registers every one of them with the pass manager."""

from passes import (align_channels, calibrate, cleanup, convert_fp16, convert_opset, dilated_conv, equalize_layers, fallback_float, fold_constants,  # noqa: F401
                    fuse_conv_add, fuse_conv_bn, fuse_hardswish, fuse_matmul_add, fuse_pad_conv, fuse_qdq, global_pool, insert_qdq,
                    int8_hardswish, merge_parallel_convs, padding_taps, prune, strided_conv, strip_quantization, widen_float16)
