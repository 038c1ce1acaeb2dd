use super::*;

fn every_value_type() -> GgufBuilder {
    GgufBuilder::new()
        .meta("general.architecture", MetaValue::String("gemma3".into()))
        .meta("u8", MetaValue::U8(7))
        .meta("i8", MetaValue::I8(-7))
        .meta("u16", MetaValue::U16(700))
        .meta("i16", MetaValue::I16(-700))
        .meta("u32", MetaValue::U32(70_000))
        .meta("i32", MetaValue::I32(-70_000))
        .meta("f32", MetaValue::F32(1.5))
        .meta("bool", MetaValue::Bool(true))
        .meta("u64", MetaValue::U64(1 << 40))
        .meta("i64", MetaValue::I64(-(1 << 40)))
        .meta("f64", MetaValue::F64(-2.25))
        .meta(
            "tokens",
            MetaValue::Array(MetaArray::String(vec![
                "<pad>".into(),
                "▁a".into(),
                "é".into(),
            ])),
        )
        .meta(
            "scores",
            MetaValue::Array(MetaArray::F32(vec![0.0, -1.5, 2.0])),
        )
        .meta("types", MetaValue::Array(MetaArray::I32(vec![3, 1, 1])))
        .meta(
            "flags",
            MetaValue::Array(MetaArray::Bool(vec![true, false])),
        )
        .meta(
            "nested",
            MetaValue::Array(MetaArray::Array(vec![
                MetaArray::U8(vec![1, 2]),
                MetaArray::U64(vec![3]),
            ])),
        )
        .tensor_f32("norm.weight", &[4], &[1.0, 2.0, 3.0, 4.0])
        .tensor("q8", &[32, 2], GgmlType::Q8_0, vec![0u8; 68])
        .tensor_f32("bias", &[3], &[0.5, 0.25, 0.125])
}

#[test]
fn round_trip_keeps_every_value_type_and_tensor() {
    let bytes = every_value_type().build();
    let header = parse(&bytes).unwrap();
    assert_eq!(header.version, 3);
    assert_eq!(header.metadata.len(), 17);
    assert_eq!(header.get("i16"), Some(&MetaValue::I16(-700)));
    assert_eq!(header.get("f64"), Some(&MetaValue::F64(-2.25)));
    assert_eq!(header.get("u64").and_then(MetaValue::as_u64), Some(1 << 40));
    assert_eq!(header.get("i8").and_then(MetaValue::as_u64), None);
    match header.get("tokens").and_then(MetaValue::as_array) {
        Some(MetaArray::String(tokens)) => assert_eq!(tokens[2], "é"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        header.get("nested"),
        Some(&MetaValue::Array(MetaArray::Array(vec![
            MetaArray::U8(vec![1, 2]),
            MetaArray::U64(vec![3])
        ])))
    );
    assert_eq!(header.tensors.len(), 3);
    let q8 = header.tensor("q8").unwrap();
    assert_eq!(
        (q8.dims.clone(), q8.ggml_type, q8.bytes, q8.elements()),
        (vec![32, 2], GgmlType::Q8_0, 68, 64)
    );
    for t in &header.tensors {
        assert_eq!(t.start % header.alignment, 0, "{} is aligned", t.name);
    }
    let bias = header.tensor("bias").unwrap();
    let data = &bytes[bias.start as usize..(bias.start + bias.bytes) as usize];
    assert_eq!(
        data,
        [0.5f32, 0.25, 0.125]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<_>>()
    );
}

#[test]
fn custom_alignment_is_honoured() {
    let bytes = GgufBuilder::new()
        .meta("general.alignment", MetaValue::U32(64))
        .tensor_f32("a", &[3], &[1.0, 2.0, 3.0])
        .tensor_f32("b", &[1], &[4.0])
        .build();
    let header = parse(&bytes).unwrap();
    assert_eq!(header.alignment, 64);
    assert_eq!(header.data_start % 64, 0);
    assert_eq!(
        header.tensor("b").unwrap().start - header.tensor("a").unwrap().start,
        64
    );
    let bad = GgufBuilder::new()
        .meta("general.alignment", MetaValue::U32(48))
        .build();
    assert!(matches!(
        parse(&bad),
        Err(GgufError::BadAlignment { value: 48 })
    ));
}

#[test]
fn every_truncation_is_an_error_with_an_offset_never_a_panic() {
    let bytes = every_value_type().build();
    let header_end = parse(&bytes).unwrap().data_start as usize;
    for len in 0..bytes.len() {
        match parse(&bytes[..len]) {
            Ok(_) => panic!("a file cut at {len} of {} bytes parsed", bytes.len()),
            Err(GgufError::Truncated {
                offset, available, ..
            }) => {
                assert!(
                    len < header_end,
                    "cut at {len}: truncated header error past the header"
                );
                assert!(offset as usize <= len, "cut at {len}: error at {offset}");
                assert!(
                    available <= len as u64 - offset,
                    "cut at {len}: {available} available from {offset}"
                );
            }
            Err(GgufError::BadTensorData { reason, .. }) => {
                assert!(reason.contains("past the end"), "cut at {len}: {reason}");
            }
            Err(GgufError::BadMagic { .. }) => assert!(len >= 4, "short magic is truncation"),
            Err(other) => panic!("cut at {len}: unexpected {other}"),
        }
    }
}

#[test]
fn corrupt_headers_name_what_is_wrong() {
    let good = every_value_type().build();

    let mut bytes = good.clone();
    bytes[0] = b'X';
    assert_eq!(
        parse(&bytes).unwrap_err().to_string(),
        "not a GGUF file: bytes 0..4 are [88, 71, 85, 70], expected \"GGUF\""
    );

    let mut bytes = good.clone();
    bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
    let e = parse(&bytes).unwrap_err().to_string();
    assert!(e.contains("big-endian"), "{e}");

    let mut bytes = good.clone();
    bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(matches!(
        parse(&bytes),
        Err(GgufError::UnsupportedVersion { version: 1, .. })
    ));

    // A tensor count that cannot fit in the file is refused before allocating.
    let mut bytes = good.clone();
    bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let e = parse(&bytes).unwrap_err();
    assert!(matches!(e, GgufError::Truncated { offset: 8, .. }), "{e}");

    // The first key's value type (after magic, version, counts, key "general.architecture").
    let tag_at = 24 + 8 + "general.architecture".len();
    let mut bytes = good.clone();
    bytes[tag_at..tag_at + 4].copy_from_slice(&99u32.to_le_bytes());
    let e = parse(&bytes).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("byte {tag_at}: metadata \"general.architecture\" has unknown value type 99")
    );

    // Invalid UTF-8 in that key.
    let mut bytes = good.clone();
    bytes[32] = 0xff;
    assert!(matches!(
        parse(&bytes),
        Err(GgufError::InvalidUtf8 { offset: 32, .. })
    ));
}

#[test]
fn bad_tensors_are_named() {
    let unknown = GgufBuilder::new()
        .tensor("w", &[32], GgmlType::Q8_0, vec![0; 34])
        .build();
    let mut bytes = unknown.clone();
    // magic, version, counts (24) + name (8 + 1) + n_dims (4) + one dim (8).
    let type_at = 24 + 9 + 4 + 8;
    assert_eq!(
        bytes[type_at..type_at + 4],
        GgmlType::Q8_0.id().to_le_bytes()
    );
    bytes[type_at..type_at + 4].copy_from_slice(&4u32.to_le_bytes());
    let e = parse(&bytes).unwrap_err().to_string();
    assert_eq!(
        e,
        format!("byte {type_at}: tensor \"w\" has unknown GGML type id 4")
    );

    let partial_block = GgufBuilder::new()
        .tensor("w", &[31], GgmlType::Q8_0, vec![0; 34])
        .build();
    let e = parse(&partial_block).unwrap_err().to_string();
    assert!(e.contains("do not fill whole blocks of 32 elements"), "{e}");

    let duplicate = GgufBuilder::new()
        .tensor_f32("w", &[1], &[1.0])
        .tensor_f32("w", &[1], &[2.0])
        .build();
    assert!(matches!(
        parse(&duplicate),
        Err(GgufError::Duplicate { what: "tensor", .. })
    ));

    let zero_dims = GgufBuilder::new()
        .tensor("w", &[], GgmlType::F32, vec![])
        .build();
    assert!(matches!(parse(&zero_dims), Err(GgufError::BadShape { .. })));
}

#[test]
fn fuzzer_findings_stay_fixed() {
    // cargo-fuzz, 2026-11-26: a tensor whose byte size overflows u64.
    let overflow: &[u8] = &[
        71, 71, 85, 70, 3, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255,
        248, 0, 0, 0, 0, 1, 5, 0, 0, 0, 0, 0, 0, 0, 0, 202, 1, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0,
        0, 64, 60,
    ];
    assert!(parse(overflow).is_err());
}
