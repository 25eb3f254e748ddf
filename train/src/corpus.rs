//! The embedded default corpus: a frozen copy of this project's own prose and Rust sources
//! (README, the model spec, the fixture notes, the `dsv3-model`/`dsv3-backends` sources and the
//! CLI), stored in `train/corpus/` and compiled into the binary. It is the project's own text
//! (MIT OR Apache-2.0), so it may be used freely; it needs no download, and because it is a
//! frozen snapshot (not the live sources) a given commit always trains on the same bytes.

/// `(name, text)` of every document, in a fixed order.
pub const DOCUMENTS: &[(&str, &str)] = &[
    (
        "project_README.md",
        include_str!("../corpus/project_README.md"),
    ),
    ("docs_spec.md", include_str!("../corpus/docs_spec.md")),
    (
        "tests_fixtures_README.md",
        include_str!("../corpus/tests_fixtures_README.md"),
    ),
    (
        "backends_src_lib.rs",
        include_str!("../corpus/backends_src_lib.rs.txt"),
    ),
    (
        "model_src_checkpoint.rs",
        include_str!("../corpus/model_src_checkpoint.rs.txt"),
    ),
    (
        "model_src_config.rs",
        include_str!("../corpus/model_src_config.rs.txt"),
    ),
    (
        "model_src_error.rs",
        include_str!("../corpus/model_src_error.rs.txt"),
    ),
    (
        "model_src_fp8.rs",
        include_str!("../corpus/model_src_fp8.rs.txt"),
    ),
    (
        "model_src_lib.rs",
        include_str!("../corpus/model_src_lib.rs.txt"),
    ),
    (
        "model_src_load.rs",
        include_str!("../corpus/model_src_load.rs.txt"),
    ),
    (
        "model_src_mla.rs",
        include_str!("../corpus/model_src_mla.rs.txt"),
    ),
    (
        "model_src_mlp.rs",
        include_str!("../corpus/model_src_mlp.rs.txt"),
    ),
    (
        "model_src_model.rs",
        include_str!("../corpus/model_src_model.rs.txt"),
    ),
    (
        "model_src_moe.rs",
        include_str!("../corpus/model_src_moe.rs.txt"),
    ),
    (
        "model_src_mtp.rs",
        include_str!("../corpus/model_src_mtp.rs.txt"),
    ),
    (
        "model_src_norm.rs",
        include_str!("../corpus/model_src_norm.rs.txt"),
    ),
    (
        "model_src_rope.rs",
        include_str!("../corpus/model_src_rope.rs.txt"),
    ),
    (
        "src_cli_mod.rs",
        include_str!("../corpus/src_cli_mod.rs.txt"),
    ),
];
