//! What the host CPU changes in ONNX Runtime's results: the int8 dot-product instructions its MLAS
//! kernels pick.
//!
//! ONNX Runtime's kernels for uint8 activations x int8 weights (the `U8S8` QGEMM behind
//! `DynamicQuantizeMatMul` and `MatMulInteger` with int8 weights) sum u8 x s8 products in pairs with
//! `vpmaddubsw` on x86 CPUs without VNNI; that instruction saturates its 16-bit sums (255 x 127 x 2 >
//! 32767), so the same graph answers differently there. With AVX-512 VNNI or AVX-VNNI the kernel is
//! `vpdpbusd(s)`, which sums in 32 bits. Dispatch as in onnxruntime's
//! `core/mlas/lib/platform.cpp` (`MlasGemmU8S8KernelAvx512Vnni` needs AVX-512 F, BW, DQ, VL and
//! VNNI; `MlasGemmU8S8KernelAvxVnni` needs AVX-VNNI); the kernels are in `QgemmU8X8KernelAvx2.S` and
//! `QgemmU8X8KernelAvx512Core.S`. uint8 x uint8 (`U8U8`) kernels widen to 16 bits first and are
//! exact everywhere; ARM's are exact too.

/// The instruction-set extensions whose absence makes int8-weight kernels saturate, as a user
/// would look them up in `/proc/cpuinfo` (`avx512_vnni`, `avx_vnni`).
pub const INT8_EXACT_FEATURES: &str = "AVX-512 VNNI (avx512_vnni) or AVX-VNNI (avx_vnni)";

/// True when ONNX Runtime's int8-weight QGEMM kernels saturate on this CPU: an x86-64 CPU without
/// AVX-512 VNNI (with the AVX-512 BW/DQ/VL its kernel also needs) and without AVX-VNNI.
pub fn int8_weight_kernels_saturate() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let avx512_vnni = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni");
        let avx_vnni = std::arch::is_x86_feature_detected!("avxvnni");
        !(avx512_vnni || avx_vnni)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
