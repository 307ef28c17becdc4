//! Every kernel name the launchers can ask for exists: in the compiled images when this build
//! has them (CI builds with `NTKV_REQUIRE_KERNELS=1`), otherwise in the kernel sources. A
//! misspelt or missing kernel fails here, on a machine without a GPU. An image that nvcc
//! compressed (its names are not in the bytes) is checked against its source.

use std::path::Path;

use ntkv::launch::{image_has_symbol, registered_kernels};

/// The entry-point names a source declares: literal `ntkv_…(` names, and the prefixes of
/// names pasted by a macro: `ntkv_topk_hist_##SUFFIX`, or a name passed as the first argument
/// of an instantiation macro (`NTKV_FD_MERGE_KERNELS(ntkv_qdecode_merge, …)` declares
/// `ntkv_qdecode_merge_f16` and `_bf16`).
fn source_names(src: &str) -> (Vec<String>, Vec<String>) {
    let (mut full, mut prefixes) = (Vec::new(), Vec::new());
    let bytes = src.as_bytes();
    let mut i = 0;
    while let Some(off) = src[i..].find("ntkv_") {
        let start = i + off;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &src[start..end];
        if src[end..].starts_with("##") || is_macro_argument(&src[..start]) {
            prefixes.push(name.to_owned());
        } else {
            full.push(name.to_owned());
        }
        i = end.max(start + 1);
    }
    (full, prefixes)
}

/// Whether the text before a name ends in `NTKV_SOME_MACRO(`: the name is an instantiation
/// macro's first argument, which the macro extends by pasting.
fn is_macro_argument(before: &str) -> bool {
    let Some(open) = before.trim_end().strip_suffix('(') else { return false };
    let ident: String =
        open.chars().rev().take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_').collect();
    ident.chars().rev().collect::<String>().starts_with("NTKV_")
}

#[test]
fn every_registered_kernel_exists() {
    let ids = registered_kernels();
    let cuda = Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
    let mut missing = Vec::new();
    let mut compressed = Vec::new();
    for id in &ids {
        let symbol = id.symbol();
        // nvcc compresses a large fatbin (qdecode's, with its 30 fast kernels); its names are
        // then not in the bytes, and the source is checked instead, as without kernels.
        let image = id.module().image().filter(|im| im.windows(5).any(|w| w == b"ntkv_"));
        if id.module().image().is_some() && image.is_none() && !compressed.contains(&id.module().name()) {
            compressed.push(id.module().name());
        }
        let found = match image {
            Some(image) => image_has_symbol(image, &symbol),
            None => {
                let src = std::fs::read_to_string(cuda.join(format!("{}.cu", id.module().name())))
                    .expect("kernel source is readable");
                let (full, prefixes) = source_names(&src);
                full.contains(&symbol) || prefixes.iter().any(|p| symbol.starts_with(p.as_str()))
            }
        };
        if !found {
            missing.push(id.to_string());
        }
    }
    assert!(missing.is_empty(), "kernels the launchers can ask for but the build lacks: {missing:?}");
    println!(
        "{} kernel ids checked ({}; compressed images checked against their sources: {compressed:?})",
        ids.len(),
        if ntkv::kernels_built() { "images" } else { "sources" }
    );
}

#[test]
fn a_misspelt_name_is_caught() {
    // The check above must be able to fail: a name that no image or source holds.
    let image = ntkv::Module::Topk.image();
    let bogus = "ntkv_topk_hist_f64";
    match image {
        Some(image) => assert!(!image_has_symbol(image, bogus)),
        None => {
            let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda/topk.cu")).unwrap();
            let (full, _) = source_names(&src);
            assert!(!full.iter().any(|n| n == bogus));
        }
    }
}
