//! ggml tensor types as GGUF stores them: the numeric id, the block size and the bytes per block.
//!
//! Every id ggml defines is listed, so a file holding a type we cannot dequantise still parses
//! (its tensors can be listed and their byte ranges checked); only [`super::Gguf::dequantize`]
//! refuses it. Ids the table does not know make the file invalid, because without a block size
//! the tensor's byte length cannot be computed and nothing after it can be trusted.

use std::fmt;

/// A ggml tensor element type (`enum ggml_type` in ggml.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
#[non_exhaustive]
pub enum GgmlType {
    /// IEEE 754 single precision.
    F32,
    /// IEEE 754 half precision.
    F16,
    /// 32 weights: f16 scale, 4-bit values offset by 8.
    Q4_0,
    /// 32 weights: f16 scale and minimum, 4-bit values.
    Q4_1,
    /// 32 weights: f16 scale, 5-bit values offset by 16.
    Q5_0,
    /// 32 weights: f16 scale and minimum, 5-bit values.
    Q5_1,
    /// 32 weights: f16 scale, signed 8-bit values.
    Q8_0,
    /// 32 weights: f16 scale and sum, signed 8-bit values (activation format).
    Q8_1,
    /// 2-bit k-quant super-blocks of 256.
    Q2_K,
    /// 3-bit k-quant super-blocks of 256.
    Q3_K,
    /// 4-bit k-quant: 8 sub-blocks of 32 with 6-bit scales and minimums.
    Q4_K,
    /// 5-bit k-quant: like `Q4_K` with one high bit per weight.
    Q5_K,
    /// 6-bit k-quant: 16 sub-blocks of 16 with signed 8-bit scales.
    Q6_K,
    /// 8-bit k-quant (activation format).
    Q8_K,
    /// i-quant, 2.06 bits per weight.
    IQ2_XXS,
    /// i-quant, 2.31 bits per weight.
    IQ2_XS,
    /// i-quant, 3.06 bits per weight.
    IQ3_XXS,
    /// i-quant, 1.56 bits per weight.
    IQ1_S,
    /// i-quant, 4.5 bits per weight, non-linear.
    IQ4_NL,
    /// i-quant, 3.44 bits per weight.
    IQ3_S,
    /// i-quant, 2.5 bits per weight.
    IQ2_S,
    /// i-quant, 4.25 bits per weight.
    IQ4_XS,
    /// Signed 8-bit integer.
    I8,
    /// Signed 16-bit integer.
    I16,
    /// Signed 32-bit integer.
    I32,
    /// Signed 64-bit integer.
    I64,
    /// IEEE 754 double precision.
    F64,
    /// i-quant, 1.75 bits per weight.
    IQ1_M,
    /// bfloat16: the upper half of an f32.
    BF16,
    /// Ternary, 1.69 bits per weight.
    TQ1_0,
    /// Ternary, 2.06 bits per weight.
    TQ2_0,
    /// Microscaling FP4: 32 e2m1 values with a shared e8m0 exponent.
    MXFP4,
}

/// Every type, in id order; `from_id` searches it.
const ALL: [GgmlType; 32] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q8_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::Q8_K,
    GgmlType::IQ2_XXS,
    GgmlType::IQ2_XS,
    GgmlType::IQ3_XXS,
    GgmlType::IQ1_S,
    GgmlType::IQ4_NL,
    GgmlType::IQ3_S,
    GgmlType::IQ2_S,
    GgmlType::IQ4_XS,
    GgmlType::I8,
    GgmlType::I16,
    GgmlType::I32,
    GgmlType::I64,
    GgmlType::F64,
    GgmlType::IQ1_M,
    GgmlType::BF16,
    GgmlType::TQ1_0,
    GgmlType::TQ2_0,
    GgmlType::MXFP4,
];

impl GgmlType {
    /// The type with ggml id `id`, or `None` for an id ggml does not define (or has retired).
    pub fn from_id(id: u32) -> Option<GgmlType> {
        ALL.into_iter().find(|ty| ty.id() == id)
    }

    /// `(ggml id, elements per block, bytes per block, name)`, from ggml's `type_traits`.
    /// An exhaustive match, so a new variant cannot be left without its traits.
    fn traits(self) -> (u32, u64, u64, &'static str) {
        match self {
            GgmlType::F32 => (0, 1, 4, "F32"),
            GgmlType::F16 => (1, 1, 2, "F16"),
            GgmlType::Q4_0 => (2, 32, 18, "Q4_0"),
            GgmlType::Q4_1 => (3, 32, 20, "Q4_1"),
            GgmlType::Q5_0 => (6, 32, 22, "Q5_0"),
            GgmlType::Q5_1 => (7, 32, 24, "Q5_1"),
            GgmlType::Q8_0 => (8, 32, 34, "Q8_0"),
            GgmlType::Q8_1 => (9, 32, 36, "Q8_1"),
            GgmlType::Q2_K => (10, 256, 84, "Q2_K"),
            GgmlType::Q3_K => (11, 256, 110, "Q3_K"),
            GgmlType::Q4_K => (12, 256, 144, "Q4_K"),
            GgmlType::Q5_K => (13, 256, 176, "Q5_K"),
            GgmlType::Q6_K => (14, 256, 210, "Q6_K"),
            GgmlType::Q8_K => (15, 256, 292, "Q8_K"),
            GgmlType::IQ2_XXS => (16, 256, 66, "IQ2_XXS"),
            GgmlType::IQ2_XS => (17, 256, 74, "IQ2_XS"),
            GgmlType::IQ3_XXS => (18, 256, 98, "IQ3_XXS"),
            GgmlType::IQ1_S => (19, 256, 50, "IQ1_S"),
            GgmlType::IQ4_NL => (20, 32, 18, "IQ4_NL"),
            GgmlType::IQ3_S => (21, 256, 110, "IQ3_S"),
            GgmlType::IQ2_S => (22, 256, 82, "IQ2_S"),
            GgmlType::IQ4_XS => (23, 256, 136, "IQ4_XS"),
            GgmlType::I8 => (24, 1, 1, "I8"),
            GgmlType::I16 => (25, 1, 2, "I16"),
            GgmlType::I32 => (26, 1, 4, "I32"),
            GgmlType::I64 => (27, 1, 8, "I64"),
            GgmlType::F64 => (28, 1, 8, "F64"),
            GgmlType::IQ1_M => (29, 256, 56, "IQ1_M"),
            GgmlType::BF16 => (30, 1, 2, "BF16"),
            GgmlType::TQ1_0 => (34, 256, 54, "TQ1_0"),
            GgmlType::TQ2_0 => (35, 256, 66, "TQ2_0"),
            GgmlType::MXFP4 => (39, 32, 17, "MXFP4"),
        }
    }

    /// The ggml id stored in GGUF tensor infos.
    pub fn id(self) -> u32 {
        self.traits().0
    }

    /// Elements per block (1 for plain float and integer types).
    pub fn block_size(self) -> u64 {
        self.traits().1
    }

    /// Bytes per block.
    pub fn type_size(self) -> u64 {
        self.traits().2
    }

    /// ggml's name for the type, e.g. `Q4_K`.
    pub fn name(self) -> &'static str {
        self.traits().3
    }

    /// Whether [`super::Gguf::dequantize`] can convert this type to f32.
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16 | BF16 | F64 | I8 | I16 | I32 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q4_K | Q5_K | Q6_K
        )
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_names_match_variants() {
        let mut seen = std::collections::HashSet::new();
        for ty in ALL {
            assert!(seen.insert(ty.id()), "duplicate id {}", ty.id());
            assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
            assert_eq!(format!("{ty:?}"), ty.name());
            assert!(ty.block_size() >= 1 && ty.type_size() >= 1);
        }
        assert_eq!(GgmlType::from_id(4), None, "Q4_2 was removed from ggml");
        assert_eq!(GgmlType::from_id(1000), None);
    }
}
