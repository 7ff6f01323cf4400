"""quantize: pure tensor quantization (torch only; no transformers, no other compressor packages).

formats   FORMATS, QuantSpec, packed_nbytes     the formats and their exact byte cost
packing   pack_bits / unpack_bits / pack_trits   table-driven bit and trit packing
grid      find_params, quantize_codes, ...       scales / zero points and the elementwise maps
ggml      GGML_TYPES, encode/decode_matrix       GGUF block types (q4_k, q8_0, tq2_0, ...), bit-exact with gguf-py
scales    round_scales, ternary_scale            fp16 (or fp16-and-bf16) scale rounding, absmean (a leaf)
qweight   QuantizedWeight, pack, unpack          codes + fp16 params <-> checkpoint tensors
rtn       quantize_rtn                           round to nearest, group-wise, batched
ternary   quantize_ternary                       absmean ternary (MoTE / BitNet b1.58)
gptq      gptq_quantize, hessian_error           GPTQ batched over experts
scale_search search_symmetric / search_affine     scales of least weighted rounding error (ggml types, imatrix)
dispatch  quantize_with, quantize, METHODS       the one entry point: gptq, imatrix (RTN on importance-searched
                                                 scales) or rtn; RTN wherever no Hessian is given
"""
from .dispatch import DATA_METHODS, METHODS, quantize, quantize_with
from .formats import ALL_FORMATS, FORMATS, GGML_FORMATS, QuantSpec, bits_per_weight, num_groups, packed_nbytes, packed_shapes
from .gptq import GPTQResult, gptq_quantize, hessian_error
from .packing import pack_bits, pack_trits, unpack_bits, unpack_trits
from .qweight import QuantizedWeight, from_packed, pack, unpack
from .rtn import quantize_rtn
from .ternary import is_ternary, quantize_ternary
