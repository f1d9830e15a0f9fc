# THE list of kernel families and instantiations compiled into sage_core._C (the one place).
#
# sage_kernel_family(<family> ARCHS <arch>... | ALL  DEFINE <macro>  BINDING <csrc file>)
#   A family is compiled into its own object library `sage_kernels_<family>`, for the
#   intersection of SAGE_CUDA_ARCHS with ARCHS (ALL = every requested arch). It is in the build
#   when that intersection is non-empty AND it has at least one instantiation; then its BINDING
#   source is compiled into the module and <macro>=1 is defined for the module's sources.
#
# sage_instantiation(<family> <kernel name> <source under kernels/src/>)
#   One translation unit = one kernel configuration. <kernel name> is what
#   sage_core.has_kernel() answers and build_info()["kernels"] lists (lower_snake_case; state
#   arch, role, dtypes, head dim: e.g. attn_sm90_qk_s8_pv_e4m3_hdim128).
#
# Adding a kernel: one sage_instantiation() line below (see packages/sage-core/HOOKS.md).

sage_kernel_family(quant ARCHS ALL             DEFINE SAGE_WITH_QUANT BINDING csrc/bind_quant.cpp)
sage_kernel_family(decode ARCHS ALL            DEFINE SAGE_WITH_DECODE BINDING csrc/bind_decode.cpp)
# sm80: also every Blackwell target (they keep mma.sync) until a tcgen05 (sm100) / NVFP4 (sm120)
# kernel exists. An 'a' cubin runs only on its own compute capability, hence 103a and 121a too.
sage_kernel_family(sm80  ARCHS 80 86 89 90a 100a 103a 120a 121a
                                               DEFINE SAGE_WITH_SM80  BINDING csrc/bind_attn_sm80.cpp)
sage_kernel_family(sm90  ARCHS 90a             DEFINE SAGE_WITH_SM90  BINDING csrc/bind_attn_sm90.cpp)
sage_kernel_family(sm100 ARCHS 100a            DEFINE SAGE_WITH_SM100 BINDING csrc/bind_attn_sm100.cpp)
sage_kernel_family(sm120 ARCHS 120a 121a       DEFINE SAGE_WITH_SM120 BINDING csrc/bind_attn_sm120.cpp)
# sm120twin: the sm120 kernel's twin MMA policy (the block-scaled FP4 product in FP16 mma.sync),
# built for Hopper so that the whole kernel but its one MMA instruction is tested on the H200.
# Its own family: the sm120 family's archs must stay 120a, the twin is a test vehicle, not a kernel
# for Hopper users (sage_torch never dispatches to it).
sage_kernel_family(sm120twin ARCHS 90a         DEFINE SAGE_WITH_SM120_TWIN BINDING csrc/bind_attn_sm120_twin.cpp)

# --- quantization (plain CUDA C++, every arch) ------------------------------------------------
sage_instantiation(quant quant_mean  quant/quant_mean.cu)   # token_mean, block_mean
sage_instantiation(quant quant_int8  quant/quant_int8.cu)   # quant_int bits=8, every granularity
sage_instantiation(quant quant_int4  quant/quant_int4.cu)   # quant_int bits=4, every granularity
sage_instantiation(quant quant_v     quant/quant_v.cu)      # quant_v_e4m3_t, quant_v_s8
sage_instantiation(quant quant_fp4   quant/quant_fp4.cu)    # quant_fp4 nvfp4 / mxfp4

# --- decode over an INT8 KV cache (plain CUDA: dp4a + fp32, every arch; split-KV + combine) ----
sage_instantiation(decode decode_s8_hdim64  decode/decode_s8_hdim64.cu)
sage_instantiation(decode decode_s8_hdim128 decode/decode_s8_hdim128.cu)
sage_instantiation(decode kv_append_s8      decode/kv_append_s8.cu)      # QuantizedKVCache.append

# --- sm80 family: mma.sync INT8/INT4 + FP16/FP8 PV (Ampere/Ada; also sm_90a and Blackwell) --
# One line per SAGE_SM80_ATTN_FWD_CONFIGS entry (kernels/include/sage/sm80/sm80_attn_fwd_launch.hpp);
# the e4m3 recipes compile to empty kernels below sm_89 (the binding refuses those GPUs).
sage_instantiation(sm80 attn_sm80_qk_s8_pv_f16_hdim64_f16 sm80/attn_sm80_qk_s8_pv_f16_hdim64_f16.cu)
sage_instantiation(sm80 attn_sm80_qk_s8_pv_f16_hdim64_bf16 sm80/attn_sm80_qk_s8_pv_f16_hdim64_bf16.cu)
sage_instantiation(sm80 attn_sm80_qk_s8_pv_f16_hdim128_f16 sm80/attn_sm80_qk_s8_pv_f16_hdim128_f16.cu)
sage_instantiation(sm80 attn_sm80_qk_s8_pv_f16_hdim128_bf16 sm80/attn_sm80_qk_s8_pv_f16_hdim128_bf16.cu)
sage_instantiation(sm80 attn_sm80_qk_s8_pv_s8_hdim64_f16 sm80/attn_sm80_qk_s8_pv_s8_hdim64_f16.cu)
sage_instantiation(sm80 attn_sm80_qk_s8_pv_s8_hdim64_bf16 sm80/attn_sm80_qk_s8_pv_s8_hdim64_bf16.cu)
sage_instantiation(sm80 attn_sm80_qk_s8_pv_s8_hdim128_f16 sm80/attn_sm80_qk_s8_pv_s8_hdim128_f16.cu)
sage_instantiation(sm80 attn_sm80_qk_s8_pv_s8_hdim128_bf16 sm80/attn_sm80_qk_s8_pv_s8_hdim128_bf16.cu)
sage_instantiation(sm80 attn_sm80_qk_s8_pv_e4m3_hdim64_f16 sm80/attn_sm80_qk_s8_pv_e4m3_hdim64_f16.cu)
sage_instantiation(sm80 attn_sm80_qk_s8_pv_e4m3_hdim64_bf16 sm80/attn_sm80_qk_s8_pv_e4m3_hdim64_bf16.cu)
sage_instantiation(sm80 attn_sm80_qk_s8_pv_e4m3_hdim128_f16 sm80/attn_sm80_qk_s8_pv_e4m3_hdim128_f16.cu)
sage_instantiation(sm80 attn_sm80_qk_s8_pv_e4m3_hdim128_bf16 sm80/attn_sm80_qk_s8_pv_e4m3_hdim128_bf16.cu)
sage_instantiation(sm80 attn_sm80_qk_s4_pv_e4m3_hdim64_f16 sm80/attn_sm80_qk_s4_pv_e4m3_hdim64_f16.cu)
sage_instantiation(sm80 attn_sm80_qk_s4_pv_e4m3_hdim64_bf16 sm80/attn_sm80_qk_s4_pv_e4m3_hdim64_bf16.cu)
sage_instantiation(sm80 attn_sm80_qk_s4_pv_e4m3_hdim128_f16 sm80/attn_sm80_qk_s4_pv_e4m3_hdim128_f16.cu)
sage_instantiation(sm80 attn_sm80_qk_s4_pv_e4m3_hdim128_bf16 sm80/attn_sm80_qk_s4_pv_e4m3_hdim128_bf16.cu)
# FP16-accumulate variants (pv_accum='f16_buffer'); the e4m3 one needs CUDA 12.8 (else an empty kernel)
sage_instantiation(sm80 attn_sm80_qk_s8_pv_f16_acc_f16_hdim64_f16 sm80/attn_sm80_qk_s8_pv_f16_acc_f16_hdim64_f16.cu)
sage_instantiation(sm80 attn_sm80_qk_s8_pv_f16_acc_f16_hdim64_bf16 sm80/attn_sm80_qk_s8_pv_f16_acc_f16_hdim64_bf16.cu)
sage_instantiation(sm80 attn_sm80_qk_s8_pv_f16_acc_f16_hdim128_f16 sm80/attn_sm80_qk_s8_pv_f16_acc_f16_hdim128_f16.cu)
sage_instantiation(sm80 attn_sm80_qk_s8_pv_f16_acc_f16_hdim128_bf16 sm80/attn_sm80_qk_s8_pv_f16_acc_f16_hdim128_bf16.cu)
sage_instantiation(sm80 attn_sm80_qk_s8_pv_e4m3_acc_f16_hdim64_f16 sm80/attn_sm80_qk_s8_pv_e4m3_acc_f16_hdim64_f16.cu)
sage_instantiation(sm80 attn_sm80_qk_s8_pv_e4m3_acc_f16_hdim64_bf16 sm80/attn_sm80_qk_s8_pv_e4m3_acc_f16_hdim64_bf16.cu)
sage_instantiation(sm80 attn_sm80_qk_s8_pv_e4m3_acc_f16_hdim128_f16 sm80/attn_sm80_qk_s8_pv_e4m3_acc_f16_hdim128_f16.cu)
sage_instantiation(sm80 attn_sm80_qk_s8_pv_e4m3_acc_f16_hdim128_bf16 sm80/attn_sm80_qk_s8_pv_e4m3_acc_f16_hdim128_bf16.cu)

# --- sm90 family: wgmma + TMA, warp-specialized (Hopper, sm_90a only) --------------------------
sage_instantiation(sm90 attn_sm90_qk_s8_pv_e4m3_hdim64_f16   sm90/attn_sm90_qk_s8_pv_e4m3_hdim64_f16.cu)
sage_instantiation(sm90 attn_sm90_qk_s8_pv_e4m3_hdim64_bf16  sm90/attn_sm90_qk_s8_pv_e4m3_hdim64_bf16.cu)
sage_instantiation(sm90 attn_sm90_qk_s8_pv_e4m3_hdim128_f16  sm90/attn_sm90_qk_s8_pv_e4m3_hdim128_f16.cu)
sage_instantiation(sm90 attn_sm90_qk_s8_pv_e4m3_hdim128_bf16 sm90/attn_sm90_qk_s8_pv_e4m3_hdim128_bf16.cu)
sage_instantiation(sm90 attn_sm90_qk_s8_pv_e4m3_one_level_hdim64_f16   sm90/attn_sm90_qk_s8_pv_e4m3_one_level_hdim64_f16.cu)
sage_instantiation(sm90 attn_sm90_qk_s8_pv_e4m3_one_level_hdim64_bf16  sm90/attn_sm90_qk_s8_pv_e4m3_one_level_hdim64_bf16.cu)
sage_instantiation(sm90 attn_sm90_qk_s8_pv_e4m3_one_level_hdim128_f16  sm90/attn_sm90_qk_s8_pv_e4m3_one_level_hdim128_f16.cu)
sage_instantiation(sm90 attn_sm90_qk_s8_pv_e4m3_one_level_hdim128_bf16 sm90/attn_sm90_qk_s8_pv_e4m3_one_level_hdim128_bf16.cu)
sage_instantiation(sm90 attn_sm90_train_s8_hdim64_f16    sm90/attn_sm90_train_s8_hdim64_f16.cu)  # SageBwd forward
sage_instantiation(sm90 attn_sm90_train_s8_hdim64_bf16   sm90/attn_sm90_train_s8_hdim64_bf16.cu)
sage_instantiation(sm90 attn_sm90_train_s8_hdim128_f16   sm90/attn_sm90_train_s8_hdim128_f16.cu)
sage_instantiation(sm90 attn_sm90_train_s8_hdim128_bf16  sm90/attn_sm90_train_s8_hdim128_bf16.cu)
sage_instantiation(sm90 attn_sm90_train_s8_bwd_hdim64_f16   sm90/attn_sm90_train_s8_bwd_hdim64_f16.cu)  # SageBwd backward
sage_instantiation(sm90 attn_sm90_train_s8_bwd_hdim64_bf16  sm90/attn_sm90_train_s8_bwd_hdim64_bf16.cu)
sage_instantiation(sm90 attn_sm90_train_s8_bwd_hdim128_f16  sm90/attn_sm90_train_s8_bwd_hdim128_f16.cu)
sage_instantiation(sm90 attn_sm90_train_s8_bwd_hdim128_bf16 sm90/attn_sm90_train_s8_bwd_hdim128_bf16.cu)
sage_instantiation(sm90 quant_sm90_qkv_fused                 sm90/quant_sm90_qkv_fused.cu)  # Q/K/V -> the formats above

# --- sm100 / sm120 families: block-scaled FP4 (Blackwell) ---------------------------------------
# sm120: qk_nvfp4_pv_nvfp4 on block-scaled mma.sync (one line per SAGE_SM120_ATTN_FWD_CONFIGS entry,
# kernels/include/sage/sm120/sm120_attn_fwd_launch.hpp); sm120twin: the same kernel, twin MMA policy.
sage_instantiation(sm120 attn_sm120_qk_nvfp4_pv_nvfp4_hdim64_f16   sm120/attn_sm120_qk_nvfp4_pv_nvfp4_hdim64_f16.cu)
sage_instantiation(sm120 attn_sm120_qk_nvfp4_pv_nvfp4_hdim64_bf16  sm120/attn_sm120_qk_nvfp4_pv_nvfp4_hdim64_bf16.cu)
sage_instantiation(sm120 attn_sm120_qk_nvfp4_pv_nvfp4_hdim128_f16  sm120/attn_sm120_qk_nvfp4_pv_nvfp4_hdim128_f16.cu)
sage_instantiation(sm120 attn_sm120_qk_nvfp4_pv_nvfp4_hdim128_bf16 sm120/attn_sm120_qk_nvfp4_pv_nvfp4_hdim128_bf16.cu)
sage_instantiation(sm120twin attn_sm120_twin_qk_nvfp4_pv_nvfp4_hdim64_f16   sm120/attn_sm120_twin_qk_nvfp4_pv_nvfp4_hdim64_f16.cu)
sage_instantiation(sm120twin attn_sm120_twin_qk_nvfp4_pv_nvfp4_hdim64_bf16  sm120/attn_sm120_twin_qk_nvfp4_pv_nvfp4_hdim64_bf16.cu)
sage_instantiation(sm120twin attn_sm120_twin_qk_nvfp4_pv_nvfp4_hdim128_f16  sm120/attn_sm120_twin_qk_nvfp4_pv_nvfp4_hdim128_f16.cu)
sage_instantiation(sm120twin attn_sm120_twin_qk_nvfp4_pv_nvfp4_hdim128_bf16 sm120/attn_sm120_twin_qk_nvfp4_pv_nvfp4_hdim128_bf16.cu)
