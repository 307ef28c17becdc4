//! The committed bindings (src/params.rs) must mirror cuda/include/ntkv_params.h.
//!
//! bindgen's generated compile-time assertions already pin each struct's size and field
//! offsets; this test catches the other drift: a struct or field added to the header without
//! re-running tools/gen-bindings.sh, or a struct without its `DeviceRepr` impl.

use std::collections::BTreeMap;

/// Every `{marker}Name { … }` in `src`, with the field names `field` finds in each body line.
fn structs(src: &str, marker: &str, field: fn(&str) -> Option<String>) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    let mut rest = src;
    while let Some(pos) = rest.find(marker) {
        rest = &rest[pos + marker.len()..];
        let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        let (Some(open), Some(close)) = (rest.find('{'), rest.find('}')) else { break };
        out.insert(name, rest[open + 1..close].lines().filter_map(field).collect());
        rest = &rest[close..];
    }
    out
}

/// C: `type name;` or `type name[N];`, comments stripped.
fn c_field(line: &str) -> Option<String> {
    let l = line.split("/*").next().unwrap_or("").split("//").next().unwrap_or("").trim();
    let decl = l.strip_suffix(';')?;
    let last = decl.split_whitespace().last()?;
    Some(last.split('[').next().unwrap_or(last).trim_start_matches('*').to_owned())
}

/// Rust: `pub name: Type,`.
fn rust_field(line: &str) -> Option<String> {
    line.trim().strip_prefix("pub ").and_then(|f| f.split(':').next()).map(|f| f.trim().to_owned())
}

fn header_structs(src: &str) -> BTreeMap<String, Vec<String>> {
    structs(src, "typedef struct ", c_field)
}

fn rust_structs(src: &str) -> BTreeMap<String, Vec<String>> {
    structs(src, "pub struct ", rust_field)
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
