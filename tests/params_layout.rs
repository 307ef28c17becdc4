//! The committed bindings (src/params.rs) must mirror cuda/include/ntkv_params.h.
//!
//! bindgen's generated compile-time assertions already pin each struct's size and field
//! offsets; this test catches the other drift: a struct or field added to the header without
//! re-running tools/gen-bindings.sh, or a struct without its `DeviceRepr` impl.

use std::collections::BTreeMap;

fn header_structs(src: &str) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    let mut rest = src;
    while let Some(pos) = rest.find("typedef struct ") {
        rest = &rest[pos + "typedef struct ".len()..];
        let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        let (Some(open), Some(close)) = (rest.find('{'), rest.find('}')) else { break };
        let body = &rest[open + 1..close];
        let fields = body
            .lines()
            .map(|l| l.split("/*").next().unwrap_or("").split("//").next().unwrap_or("").trim())
            .filter(|l| l.ends_with(';'))
            .filter_map(|l| {
                let decl = l.trim_end_matches(';');
                let last = decl.split_whitespace().last()?;
                Some(last.split('[').next().unwrap_or(last).trim_start_matches('*').to_owned())
            })
            .collect();
        out.insert(name, fields);
        rest = &rest[close..];
    }
    out
}

fn rust_structs(src: &str) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    let mut rest = src;
    while let Some(pos) = rest.find("pub struct ") {
        rest = &rest[pos + "pub struct ".len()..];
        let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        let (Some(open), Some(close)) = (rest.find('{'), rest.find('}')) else { break };
        let fields = rest[open + 1..close]
            .lines()
            .filter_map(|l| {
                l.trim().strip_prefix("pub ").and_then(|f| f.split(':').next()).map(|f| f.trim().to_owned())
            })
            .collect();
        out.insert(name, fields);
        rest = &rest[close..];
    }
    out
}

#[test]
fn bindings_match_header() {
    let header = include_str!("../cuda/include/ntkv_params.h");
    let bindings = include_str!("../src/params.rs");
    let h = header_structs(header);
    let r = rust_structs(bindings);
    assert!(!h.is_empty(), "no structs parsed from the header");
    assert_eq!(
        h.keys().collect::<Vec<_>>(),
        r.keys().collect::<Vec<_>>(),
        "struct sets differ: run tools/gen-bindings.sh and commit src/params.rs"
    );
    for (name, fields) in &h {
        assert_eq!(Some(fields), r.get(name), "fields of {name} differ: run tools/gen-bindings.sh");
    }
}

#[test]
fn every_struct_is_device_repr() {
    let header = include_str!("../cuda/include/ntkv_params.h");
    let repr = include_str!("../src/params_repr.rs");
    for name in header_structs(header).keys() {
        assert!(
            repr.contains(&format!("unsafe impl DeviceRepr for {name} {{}}")),
            "{name} has no DeviceRepr impl in src/params_repr.rs"
        );
    }
}

#[test]
fn parsers_see_fields() {
    let h = header_structs("typedef struct A {\n  uint64_t n; /* c */\n  uint32_t x[2];\n} A;");
    assert_eq!(h.get("A"), Some(&vec!["n".to_owned(), "x".to_owned()]));
}
