//! Manifest canonical encoding, signing, architecture checks, delta planning and assembly.

use std::{
    collections::{BTreeMap, HashSet},
    os::unix::fs::PermissionsExt,
};

use llmchain_artifact::{
    Digest, Error, Manifest, SigningKey, TrustedKeys, assemble_safetensors, delta_bytes_from, plan_delta,
    testing::{synthetic_version, tiny_llama},
};
use llmchain_proto::{ApiError, pb};
use proptest::prelude::*;
use prost::Message;

fn v1() -> (Manifest, BTreeMap<Digest, Vec<u8>>) {
    synthetic_version("smol", 1, 0, &tiny_llama(30), |_| 1)
}

fn key(seed: u8) -> SigningKey {
    SigningKey::from_seed([seed; 32])
}

#[test]
fn canonical_bytes_round_trip() {
    let (m, _) = v1();
    let bytes = m.canonical_bytes();
    let back = Manifest::from_canonical_bytes(&bytes).unwrap();
    assert_eq!(back, m);
    assert_eq!(back.canonical_bytes(), bytes);
}

#[test]
fn order_of_tensors_does_not_change_canonical_bytes() {
    let (m, _) = v1();
    let mut shuffled = m.clone();
    shuffled.tensors.reverse();
    assert_eq!(shuffled.canonical_bytes(), m.canonical_bytes());
}

#[test]
fn unsorted_encoding_is_refused() {
    let (m, _) = v1();
    let mut wire = pb::Manifest::from(m);
    wire.tensors.swap(0, 1);
    let err = Manifest::from_canonical_bytes(&wire.encode_to_vec()).unwrap_err();
    assert!(matches!(err, Error::NotCanonical(_)), "{err}");
}

#[test]
fn unknown_field_is_refused() {
    let (m, _) = v1();
    let mut bytes = m.canonical_bytes();
    // Field 99, varint 1: a reader that drops it would trust bytes the signer never meant.
    bytes.extend_from_slice(&[0x98, 0x06, 0x01]);
    let err = Manifest::from_canonical_bytes(&bytes).unwrap_err();
    assert!(matches!(err, Error::NotCanonical(_)), "{err}");
}

#[test]
fn invalid_fields_are_named() {
    let (m, _) = v1();
    let mut wire = pb::Manifest::from(m.clone());
    wire.tensors[3].size += 4;
    let err = Manifest::try_from(wire).unwrap_err();
    assert!(matches!(&err, ApiError::InvalidArgument { field, .. } if field == "tensors[3].size"), "{err}");

    let mut wire = pb::Manifest::from(m);
    wire.tensors[5].name = wire.tensors[4].name.clone();
    let err = Manifest::try_from(wire).unwrap_err();
    assert!(err.to_string().contains("is repeated"), "{err}");
}

#[test]
fn sign_and_verify() {
    let (m, _) = v1();
    let k = key(7);
    let signed = k.sign(&m);
    assert_eq!(signed.key_id, k.public().key_id());
    let trusted = TrustedKeys::new([k.public()]);
    assert_eq!(trusted.verify(&signed).unwrap(), m);

    let other = TrustedKeys::new([key(8).public()]);
    assert!(matches!(other.verify(&signed), Err(Error::UnknownKey(_))));

    // A signature by another key under the trusted key's id does not verify.
    let mut forged = key(8).sign(&m);
    forged.key_id = signed.key_id.clone();
    assert!(matches!(trusted.verify(&forged), Err(Error::BadSignature(_))));
}

#[test]
fn key_id_is_prefix_of_public_key_hash() {
    let k = key(1);
    let id = k.public().key_id();
    let d = llmchain_artifact::digest_bytes(&k.public().to_bytes());
    assert_eq!(id, format!("ed25519:{}", &d.hex()[..16]));
}

#[test]
fn key_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trainer.key");
    let k = SigningKey::generate().unwrap();
    k.save(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(SigningKey::load(&path).unwrap().public(), k.public());
    assert!(k.save(&path).is_err(), "must not overwrite an existing key");

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = SigningKey::load(&path).unwrap_err();
    assert!(err.to_string().contains("too open"), "{err}");

    let pubpath = dir.path().join("trainer.pub");
    k.public().save(&pubpath).unwrap();
    assert_eq!(llmchain_artifact::PublicKey::load(&pubpath).unwrap(), k.public());
    std::fs::write(dir.path().join("bad.pub"), "zz").unwrap();
    assert!(llmchain_artifact::PublicKey::load(&dir.path().join("bad.pub")).is_err());
}

#[test]
fn architecture_accepts_exactly_its_tensor_set() {
    let arch = tiny_llama(30);
    let (m, _) = v1();
    assert_eq!(m.tensors.len(), 2 + 30 * 9);
    arch.check_tensors(&m.tensors).unwrap();

    let mut missing = m.tensors.clone();
    missing.retain(|t| t.name != "model.layers.7.mlp.up_proj.weight");
    let err = arch.check_tensors(&missing).unwrap_err().to_string();
    assert!(err.contains("\"model.layers.7.mlp.up_proj.weight\" is missing"), "{err}");

    let mut extra = m.tensors.clone();
    let mut t = extra[0].clone();
    t.name = "model.layers.30.mlp.up_proj.weight".into();
    extra.push(t);
    let err = arch.check_tensors(&extra).unwrap_err().to_string();
    assert!(err.contains("model.layers.30.mlp.up_proj.weight") && err.contains("30 layers"), "{err}");

    let mut shaped = m.tensors.clone();
    let q = shaped.iter_mut().find(|t| t.name == "model.layers.0.self_attn.k_proj.weight").unwrap();
    q.shape = vec![16, 16];
    let err = arch.check_tensors(&shaped).unwrap_err().to_string();
    assert!(err.contains("has shape [16, 16], the architecture needs [8, 16]"), "{err}");

    let mut head = m.tensors.clone();
    let mut t = head.iter().find(|t| t.name == "model.embed_tokens.weight").unwrap().clone();
    t.name = "lm_head.weight".into();
    head.push(t);
    let err = arch.check_tensors(&head).unwrap_err().to_string();
    assert!(err.contains("tie_word_embeddings"), "{err}");
}

#[test]
fn lora_adapters_need_a_rank_and_come_in_pairs() {
    let mut arch = tiny_llama(2);
    arch.lora_rank = 4;
    let (m, _) = synthetic_version("lora", 1, 0, &arch, |_| 0);
    arch.check_tensors(&m.tensors).unwrap();
    assert!(m.tensor("model.layers.1.mlp.down_proj.lora_A.weight").unwrap().shape == vec![4, 24]);

    let mut unpaired = m.tensors.clone();
    unpaired.retain(|t| t.name != "model.layers.0.self_attn.q_proj.lora_B.weight");
    let err = arch.check_tensors(&unpaired).unwrap_err().to_string();
    assert!(err.contains("without its LoRA partner"), "{err}");

    let mut no_rank = arch.clone();
    no_rank.lora_rank = 0;
    let err = no_rank.check_tensors(&m.tensors).unwrap_err().to_string();
    assert!(err.contains("lora_rank 0"), "{err}");
}

#[test]
fn delta_of_two_changed_layers() {
    let (m1, _) = v1();
    let changed =
        |name: &str| u64::from(name.starts_with("model.layers.28.") || name.starts_with("model.layers.29."));
    let (m2, _) = synthetic_version("smol", 2, 1, &tiny_llama(30), |n| 1 + changed(n));
    let have: HashSet<Digest> = m1.tensors.iter().map(|t| t.digest).collect();
    let plan = plan_delta(&m2, &have);
    assert_eq!(plan.needed.len(), 18);
    assert!(plan.needed.iter().all(|t| changed(&t.name) == 1));
    let per_layer: u64 =
        m2.tensors.iter().filter(|t| t.name.starts_with("model.layers.29.")).map(|t| t.size).sum();
    assert_eq!(plan.delta_bytes, 2 * per_layer);
    assert_eq!(plan.total_bytes, m2.total_bytes());
    assert_eq!(delta_bytes_from(&m2, &m1), plan.delta_bytes);
    assert_eq!(plan_delta(&m2, &HashSet::new()).delta_bytes, m2.total_bytes());
}

#[test]
fn delta_counts_shared_digests_once() {
    let (mut m, _) = v1();
    let (d, shape) = (m.tensors[0].digest, m.tensors[0].shape.clone());
    for t in m.tensors.iter_mut().filter(|t| t.shape == shape) {
        t.digest = d;
    }
    let plan = plan_delta(&m, &HashSet::new());
    assert_eq!(plan.needed.iter().filter(|t| t.digest == d).count(), 1);
}

struct Mem<'a>(&'a BTreeMap<Digest, Vec<u8>>);

impl llmchain_artifact::BlobSource for Mem<'_> {
    fn open(&self, digest: &Digest) -> std::io::Result<Box<dyn std::io::Read + '_>> {
        let bytes = self.0.get(digest).ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))?;
        Ok(Box::new(&bytes[..]))
    }
}

#[test]
fn assembled_safetensors_holds_every_blob() {
    let (m, blobs) = synthetic_version("smol", 1, 0, &tiny_llama(3), |_| 5);
    let mut out = Vec::new();
    let n = assemble_safetensors(&m, &Mem(&blobs), &mut out).unwrap();
    assert_eq!(n, out.len() as u64);
    let st = safetensors::SafeTensors::deserialize(&out).unwrap();
    assert_eq!(st.len(), m.tensors.len());
    for t in &m.tensors {
        let view = st.tensor(&t.name).unwrap();
        assert_eq!(view.dtype(), safetensors::Dtype::F32);
        assert_eq!(view.shape().iter().map(|&d| d as u64).collect::<Vec<_>>(), t.shape);
        assert_eq!(view.data(), &blobs[&t.digest][..]);
    }
}

#[test]
fn assembly_refuses_a_corrupt_blob() {
    let (m, mut blobs) = synthetic_version("smol", 1, 0, &tiny_llama(1), |_| 5);
    let victim = m.tensors[2].digest;
    blobs.get_mut(&victim).unwrap()[3] ^= 1;
    let err = assemble_safetensors(&m, &Mem(&blobs), &mut Vec::new()).unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { expected, .. } if expected == victim), "{err}");

    blobs.get_mut(&victim).unwrap().push(0);
    let err = assemble_safetensors(&m, &Mem(&blobs), &mut Vec::new()).unwrap_err();
    assert!(matches!(err, Error::SizeMismatch { .. }), "{err}");
}

fn arb_manifest() -> impl Strategy<Value = Manifest> {
    (
        1u64..1_000_000,
        "[ -~]{0,40}",
        proptest::collection::vec(("[a-z]{1,8}", -1e9f64..1e9), 0..5),
        any::<bool>(),
    )
        .prop_map(|(version, note, metrics, expires)| {
            let (mut m, _) = synthetic_version("prop", version, version - 1, &tiny_llama(1), |_| version);
            m.training.note = note;
            let mut seen = HashSet::new();
            m.training.metrics = metrics
                .into_iter()
                .filter(|(n, _)| seen.insert(n.clone()))
                .map(|(name, value)| llmchain_artifact::Metric { name, value })
                .collect();
            m.training.metrics.sort_by(|a, b| a.name.cmp(&b.name));
            if expires {
                m.expires_at = Some(m.created_at + std::time::Duration::from_secs(version));
            }
            m
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = Manifest::from_canonical_bytes(&bytes);
    }

    #[test]
    fn decoding_mutated_manifests_never_panics(pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let (m, _) = synthetic_version("prop", 2, 1, &tiny_llama(1), |_| 0);
        let mut bytes = m.canonical_bytes();
        let i = pos.index(bytes.len());
        bytes[i] = byte;
        if let Ok(back) = Manifest::from_canonical_bytes(&bytes) {
            prop_assert_eq!(back.canonical_bytes(), bytes);
        }
    }

    #[test]
    fn sign_verify_round_trip(m in arb_manifest(), seed in any::<u8>()) {
        let k = key(seed);
        let signed = k.sign(&m);
        let got = TrustedKeys::new([k.public()]).verify(&signed).unwrap();
        prop_assert_eq!(got, m);
    }

    #[test]
    fn tampering_any_byte_fails_verification(
        m in arb_manifest(), pos in any::<prop::sample::Index>(), flip in 1u8..=255, in_signature in any::<bool>()
    ) {
        let k = key(3);
        let mut signed = k.sign(&m);
        if in_signature {
            signed.signature[pos.index(64)] ^= flip;
        } else {
            let i = pos.index(signed.manifest.len());
            signed.manifest[i] ^= flip;
        }
        let res = TrustedKeys::new([k.public()]).verify(&signed);
        prop_assert!(matches!(res, Err(Error::BadSignature(_))), "tampered manifest verified: {:?}", res.map(|m| m.id));
    }
}
