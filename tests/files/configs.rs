//! Configs in every form HF and DeepSeek publish, and the released ones scaled down.

use dsv3_model::{load, AttentionMode, DeepseekV3Config, LoadOptions};
use serde_json::{json, Value};

use crate::common::*;
use crate::model::check_golden_within;

use super::*;

/// Fault 1: transformers' config class copies `rope_scaling.type` into `rope_type` and
/// `save_pretrained` writes both; such a config loads and computes what the released form does.
#[test]
fn config_resaved_by_transformers_loads_with_identical_logits() {
    let released = fixture("tiny-qlora");
    let resaved = copy_fixture("tiny-qlora");
    let mut c = read_json(&resaved.join("config.json"));
    c["rope_scaling"]["rope_type"] = c["rope_scaling"]["type"].clone();
    assert_eq!(c["rope_scaling"]["type"], "yarn");
    write_json(&resaved.join("config.json"), &c);
    let ids = golden_ids(&released);
    let (a, _) = loads(&released);
    let (b, _) = loads(&resaved);
    assert_eq!(a.config.yarn(), b.config.yarn());
    let (la, lb) = (logits(&a, &ids), logits(&b, &ids));
    assert!(la.iter().zip(&lb).all(|(x, y)| x.to_bits() == y.to_bits()));

    // The smallest input of the report: the holdout-style rope_scaling, both keys.
    let holdout = json!({"type": "yarn", "rope_type": "yarn", "factor": 40.0,
        "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
        "mscale": 1.0, "mscale_all_dim": 1.0});
    let cfg = parse(&json!({ "rope_scaling": holdout })).unwrap();
    let y = cfg.yarn().expect("yarn");
    assert_eq!((y.factor, y.original_max_position_embeddings), (40.0, 4096));
}

/// Every form HF and DeepSeek write `rope_scaling` in means the same rope: `type`, `rope_type`,
/// both, integers or floats, and HF 5.x's `rope_parameters` (theta inside).
#[test]
fn rope_scaling_in_every_published_form() {
    let base = DeepseekV3Config::deepseek_v3_671b();
    let want = (base.yarn().unwrap(), base.rope_base());
    let forms = [
        json!({"rope_theta": 10000, "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096}}),
        json!({"rope_theta": 10000.0, "rope_scaling": {"rope_type": "yarn", "factor": 40.0, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1, "mscale_all_dim": 1, "original_max_position_embeddings": 4096}}),
        json!({"rope_theta": 10000, "rope_scaling": {"type": "yarn", "rope_type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096.0}}),
        json!({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096}}),
    ];
    for f in &forms {
        let c = parse(f).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!((c.yarn().unwrap(), c.rope_base()), want, "{f}");
        // What we save reads back the same (and carries both keys, as transformers writes).
        let saved: Value = serde_json::from_str(&c.to_json()).unwrap();
        let r = saved
            .get("rope_scaling")
            .or(saved.get("rope_parameters"))
            .unwrap();
        assert_eq!(
            (&r["type"], &r["rope_type"]),
            (&json!("yarn"), &json!("yarn"))
        );
        assert_eq!(parse(&saved).unwrap(), c);
    }
}

/// Fields this architecture cannot honour are refused in one line naming the field; unknown
/// fields are tolerated.
#[test]
fn unsupported_fields_are_refused_by_name() {
    let ok = read_json(&released_config("deepseek-v3"));
    let mut extra = ok.clone();
    extra["some_future_field"] = json!({"nested": [1, 2]});
    extra["pad_token_id"] = Value::Null;
    parse(&extra).expect("unknown fields are tolerated");
    let cases: [(&str, Value, &str); 7] = [
        ("topk_method", json!("group_limited_greedy"), "topk_method"), // DeepSeek-V2
        ("topk_method", json!("greedy"), "topk_method"),               // V2-Lite
        ("scoring_func", json!("softmax"), "scoring_func"),            // V2
        ("hidden_act", json!("gelu"), "hidden_act"),
        (
            "rope_scaling",
            json!({"type": "linear", "factor": 2.0}),
            "linear",
        ),
        (
            "rope_scaling",
            json!({"type": "yarn", "rope_type": "dynamic", "factor": 2.0}),
            "rope_type",
        ),
        (
            "rope_scaling",
            json!({"type": "yarn", "factor": 4, "original_max_position_embeddings": 4096.5}),
            "original_max_position_embeddings",
        ),
    ];
    for (field, value, needle) in cases {
        let mut c = ok.clone();
        c[field] = value.clone();
        let e = parse(&c).expect_err(&format!("{field} = {value} must be refused"));
        assert!(e.contains(needle), "{field} = {value}: {e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }
}

/// The four releases of the V3 line share every architectural field (the scaled fixture
/// `released/deepseek-v3` stands for all four); V3.1 adds `scale_fmt: ue8m0`.
#[test]
fn released_v3_line_shares_the_architecture() {
    let strip = |name: &str| {
        let mut v = read_json(&released_config(name));
        v.as_object_mut().unwrap().remove("transformers_version");
        v
    };
    let v3 = strip("deepseek-v3");
    for n in ["deepseek-v3-0324", "deepseek-r1", "deepseek-r1-0528"] {
        assert_eq!(strip(n), v3, "{n}");
    }
    let mut v31 = strip("deepseek-v3.1");
    assert_eq!(v31["quantization_config"]["scale_fmt"], "ue8m0");
    v31["quantization_config"]
        .as_object_mut()
        .unwrap()
        .remove("scale_fmt");
    assert_eq!(v31, v3);
}

/// `inspect` on every released config: it loads, and the counts are the published ones.
/// Published: DeepSeek-V3 671B main model + 14B MTP module (README; the HF model card lists
/// 685B), 37B activated (technical report); Kimi-K2 1T total, 32B activated (model card: "32
/// billion activated parameters and 1 trillion total parameters"); Moonlight-16B-A3B 16B total,
/// 3B activated (model card). Tolerances follow the rounding of each figure: the main 671B to
/// ±0.5B; 37B, 32B, 3B and the MTP's 14B to ±1B (our count of activated parameters includes the
/// embedding row and lm_head, whose counting the sources do not state: 37.55B; the MTP module,
/// one MoE block plus eh_proj, norms and its own embedding and head copies, is 13.46B, and
/// 671.03 + 13.46 = 684.5B against the card's 685B); "1T" to ±50B (ours: 1026B).
#[test]
fn inspect_released_configs_prints_published_sizes() {
    let mut seen = Vec::new();
    for name in RELEASED {
        let path = released_config(name);
        let text = dsv3(&["inspect", "--config", path.to_str().unwrap()])
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(text.contains("parameters:"), "{name}: {text}");
        let j: Value = serde_json::from_str(
            &dsv3(&["inspect", "--config", path.to_str().unwrap(), "--json"]).unwrap(),
        )
        .unwrap();
        let b = |k: &str| j[k].as_u64().unwrap() as f64 / 1e9;
        let (total, active, mtp) = (
            b("params_total"),
            b("params_active_per_token"),
            b("params_mtp"),
        );
        println!("{name}: total {total:.2}B (MTP {mtp:.2}B), active {active:.2}B");
        let near = |x: f64, want: f64, tol: f64| (x - want).abs() <= tol;
        match name {
            "kimi-k2" => {
                assert!(
                    near(total, 1000.0, 50.0) && near(active, 32.0, 1.0),
                    "{name}"
                );
                assert_eq!(mtp, 0.0);
            }
            "moonlight-16b-a3b" => {
                assert!(near(total, 16.0, 0.5) && near(active, 3.0, 1.0), "{name}");
            }
            _ => {
                assert!(near(total - mtp, 671.0, 0.5), "{name}: {total} - {mtp}");
                assert!(
                    near(mtp, 14.0, 1.0) && near(total, 685.0, 1.0),
                    "{name}: MTP {mtp}"
                );
                assert!(near(active, 37.0, 1.0), "{name}: active {active}");
            }
        }
        seen.push(name);
    }
    assert_eq!(seen.len(), RELEASED.len());
}

/// Each released config scaled down (only size fields changed) computes what the float64
/// reference (asserted equal to HF transformers in float64) computes: logits, MTP logits and
/// routing, with both attention forms.
#[test]
fn scaled_released_models_match_golden() {
    for name in [
        "deepseek-v3",
        "deepseek-v3.1",
        "kimi-k2",
        "moonlight-16b-a3b",
    ] {
        let dir = released_fixture(name);
        let scaled = read_json(&dir.join("config.json"));
        let full = read_json(&released_config(name));
        for (k, v) in full.as_object().unwrap() {
            let size_field = [
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "moe_intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "q_lora_rank",
                "kv_lora_rank",
                "qk_nope_head_dim",
                "qk_rope_head_dim",
                "v_head_dim",
                "n_routed_experts",
            ]
            .contains(&k.as_str());
            assert!(size_field || &scaled[k] == v, "{name}: {k} changed");
        }
        let (model, report) = load::<B>(
            &dir,
            &device(),
            &LoadOptions {
                strict: true,
                skip_mtp: false,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(report.warnings.is_empty(), "{name}: {:?}", report.warnings);
        for mode in [AttentionMode::Absorbed, AttentionMode::Naive] {
            check_golden_within(&model, &dir.join("golden.safetensors"), mode, RELEASED_TOL);
        }
    }
}

/// `norm_topk_prob: false` (routed weights not renormalised over the k chosen) on the scaled
/// Moonlight model: the golden of the same weights with the field flipped.
#[test]
fn norm_topk_prob_false_matches_golden() {
    let src = released_fixture("moonlight-16b-a3b");
    let dir = scratch("unnormed");
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let mut c = read_json(&src.join("config.json"));
    c["norm_topk_prob"] = json!(false);
    write_json(&dir.join("config.json"), &c);
    let (model, _) = loads(&dir);
    check_golden_within(
        &model,
        &src.join("golden-norm_topk_prob-false.safetensors"),
        AttentionMode::Absorbed,
        RELEASED_TOL,
    );
}

/// `init` from each scaled released config, then `score`: the CLI path a user takes to try a
/// config. Every CLI step must succeed and give a finite perplexity.
#[test]
fn init_then_score_each_scaled_released_config() {
    for name in [
        "deepseek-v3",
        "deepseek-v3.1",
        "kimi-k2",
        "moonlight-16b-a3b",
    ] {
        let cfg = released_fixture(name).join("config.json");
        let out = scratch(name);
        dsv3(&[
            "init",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--dtype",
            "bf16",
        ])
        .unwrap_or_else(|e| panic!("{name}: init: {e}"));
        let mtp = read_json(&cfg)["num_nextn_predict_layers"]
            .as_u64()
            .unwrap()
            > 0;
        let mut args = vec![
            "score",
            "--model",
            out.to_str().unwrap(),
            "--tokens",
            "3,17,42,5,99,8",
        ];
        if mtp {
            args.push("--mtp");
        }
        let text = dsv3(&args).unwrap_or_else(|e| panic!("{name}: score: {e}"));
        let ppl: f64 = text
            .lines()
            .find_map(|l| l.split("perplexity").nth(1))
            .and_then(|r| {
                r.trim_start_matches([':', ' ', '='])
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("{name}: no perplexity in {text}"));
        assert!(ppl.is_finite() && ppl > 1.0, "{name}: perplexity {ppl}");
    }
}
