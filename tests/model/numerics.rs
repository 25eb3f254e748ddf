//! Pieces checked on their own: FP8 codes, the 671B YaRN table, the router, config validation.

use dsv3_model::fp8::e4m3_to_f32;
use dsv3_model::DeepseekV3Config;
use dsv3_model::{route, RouterConfig};
use dsv3_model::{softmax_scale, yarn_correction_range, RotaryEmbedding};

use crate::common::*;

/// Every one of the 256 e4m3 codes decodes to torch's `float8_e4m3fn` value.
#[test]
fn every_e4m3_code_matches_torch() {
    let g = Golden::read(&fixtures().join("e4m3.safetensors"));
    let (_, want) = g.f("values");
    assert_eq!(want.len(), 256);
    for code in 0..=255u8 {
        let got = e4m3_to_f32(code);
        let w = want[code as usize];
        if w.is_nan() {
            assert!(got.is_nan(), "code {code:#04x} should be NaN");
        } else {
            assert_eq!(got as f64, w, "code {code:#04x}");
        }
    }
}

/// The released model's YaRN: blend range 10..23, softmax scale 0.1352337788608801, and the
/// whole frequency table equal to HF's `_compute_yarn_parameters`.
#[test]
fn yarn_671b_table() {
    let cfg = DeepseekV3Config::deepseek_v3_671b();
    let y = cfg.yarn().unwrap();
    let (low, high) = yarn_correction_range(&y, cfg.qk_rope_head_dim, cfg.rope_base());
    assert_eq!((low, high), (10.0, 23.0));
    let s = softmax_scale(&cfg);
    assert!((s - 0.1352337788608801).abs() < 1e-15, "softmax scale {s}");
    let rope = RotaryEmbedding::new(&cfg);
    assert_eq!(rope.attention_factor, 1.0);
    let g = Golden::read(&fixtures().join("yarn-671b.safetensors"));
    let (_, want) = g.f("inv_freq");
    assert_eq!(rope.inv_freq.len(), 32);
    for (i, (a, b)) in rope.inv_freq.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= 1e-12 * b.abs(),
            "inv_freq[{i}]: {a} vs {b}"
        );
    }
    assert!((g.f("softmax_scale").1[0] - s).abs() < 1e-15);
}

/// Angles near 128K: cos/sin tables agree with float64 to f32 rounding (the float32 angle product
/// of the reference implementations is off by ~1e-2 rad there).
#[test]
fn rope_is_accurate_near_128k() {
    let cfg = DeepseekV3Config::deepseek_v3_671b();
    let rope = RotaryEmbedding::new(&cfg);
    let start = 131_000;
    let (cos, sin) = rope.cos_sin::<B>(start, 4, &device());
    let (cos, sin) = (to_vec(cos), to_vec(sin));
    let mut worst = 0f64;
    for p in 0..4 {
        for (i, f) in rope.inv_freq.iter().enumerate() {
            let a = (start + p) as f64 * f;
            // Interleaved tables: (c, c) and (-s, s) per pair.
            let at = p * 64 + 2 * i;
            worst = worst.max((cos[at] as f64 - a.cos()).abs());
            worst = worst.max((cos[at + 1] as f64 - a.cos()).abs());
            worst = worst.max((sin[at] as f64 + a.sin()).abs());
            worst = worst.max((sin[at + 1] as f64 - a.sin()).abs());
            // What float32 angles would give, to show the test can tell the difference.
        }
    }
    let f32_err = rope
        .inv_freq
        .iter()
        .map(|&f| {
            let a32 = ((start as f32) * (f as f32)) as f64;
            (a32.cos() - (start as f64 * f).cos()).abs()
        })
        .fold(0.0, f64::max);
    assert!(worst < 1e-7, "cos/sin error {worst:e}");
    assert!(
        f32_err > 1e-4,
        "float32 angle error unexpectedly small: {f32_err:e}"
    );
}

/// Float64 reference of spec §5 for one row.
fn route_ref(logits: &[f64], bias: &[f64], cfg: &RouterConfig, neg_inf_mask: bool) -> Vec<usize> {
    let e = logits.len();
    let s: Vec<f64> = logits.iter().map(|x| 1.0 / (1.0 + (-x).exp())).collect();
    let mut b: Vec<f64> = s.iter().zip(bias).map(|(a, c)| a + c).collect();
    let per = e / cfg.n_group;
    let mut gs: Vec<(f64, usize)> = (0..cfg.n_group)
        .map(|g| {
            let mut v: Vec<f64> = b[g * per..(g + 1) * per].to_vec();
            v.sort_by(|x, y| y.partial_cmp(x).unwrap());
            (v[0] + v[1], g)
        })
        .collect();
    gs.sort_by(|x, y| y.0.partial_cmp(&x.0).unwrap());
    let kept: Vec<usize> = gs[..cfg.topk_group].iter().map(|x| x.1).collect();
    for (i, v) in b.iter_mut().enumerate() {
        if !kept.contains(&(i / per)) {
            *v = if neg_inf_mask { f64::NEG_INFINITY } else { 0.0 };
        }
    }
    let mut idx: Vec<usize> = (0..e).collect();
    idx.sort_by(|&x, &y| b[y].partial_cmp(&b[x]).unwrap());
    let mut top = idx[..cfg.num_experts_per_tok].to_vec();
    top.sort();
    top
}

/// A kept expert with `sigmoid + bias < 0` must beat every expert of a dropped group (−inf
/// masking). Masking with 0.0, as older HF releases did, picks a dropped expert instead.
#[test]
fn router_masks_dropped_groups_with_neg_inf() {
    let cfg = RouterConfig::new(8, 3, 4, 2).with_routed_scaling_factor(2.5);
    // Groups {0,1} {2,3} {4,5} {6,7}; target biased scores: groups 0 and 1 win (sums 1.3, 1.15
    // against 1.1 and 0.3) but hold only two positive experts, so the third choice, expert 3,
    // has `sigmoid + bias = -0.05 < 0`. Zero-masking would pick a dropped expert (score 0) instead.
    let target = [1.4, -0.1, 1.2, -0.05, 0.5, 0.6, 0.2, 0.1];
    let logits: [f64; 8] = [0.3, -0.2, 0.9, 0.1, 1.5, 1.2, 0.4, -0.7];
    let bias: Vec<f64> = target
        .iter()
        .zip(&logits)
        .map(|(t, l)| t - 1.0 / (1.0 + (-l).exp()))
        .collect();
    let want = route_ref(&logits, &bias, &cfg, true);
    let zero_masked = route_ref(&logits, &bias, &cfg, false);
    assert_ne!(
        want, zero_masked,
        "the case must discriminate the two maskings"
    );
    assert!(
        want.contains(&3),
        "expert 3 (negative biased score) must be chosen: {want:?}"
    );
    let lt = tensor2(logits.iter().map(|&v| v as f32).collect(), [1, 8]);
    let bt = burn::tensor::Tensor::<B, 1>::from_floats(
        bias.iter()
            .map(|&v| v as f32)
            .collect::<Vec<_>>()
            .as_slice(),
        &device(),
    );
    let (idx, w) = route(lt, bt, &cfg);
    let mut got: Vec<usize> = idx
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .unwrap()
        .iter()
        .map(|&v| v as usize)
        .collect();
    got.sort();
    assert_eq!(got, want);
    // Weights: unbiased sigmoid, renormalised, × 2.5.
    let w = to_vec(w);
    assert!((w.iter().sum::<f32>() - 2.5).abs() < 1e-6);
}

/// The router on random rows against the float64 reference, with group limiting and bias.
#[test]
fn router_matches_reference_on_random_rows() {
    let cfg = RouterConfig::new(24, 5, 6, 3).with_routed_scaling_factor(1.7);
    let mut rng = SplitMix64::new(12345);
    let mut rnd = || symmetric(&mut rng);
    let rows = 37;
    let logits: Vec<f64> = (0..rows * 24).map(|_| 3.0 * rnd()).collect();
    let bias: Vec<f64> = (0..24).map(|_| rnd()).collect();
    let lt = tensor2(logits.iter().map(|&v| v as f32).collect(), [rows, 24]);
    let bt = burn::tensor::Tensor::<B, 1>::from_floats(
        bias.iter()
            .map(|&v| v as f32)
            .collect::<Vec<_>>()
            .as_slice(),
        &device(),
    );
    let (idx, _) = route(lt, bt, &cfg);
    let got: Vec<i64> = idx.into_data().convert::<i64>().to_vec().unwrap();
    for r in 0..rows {
        let mut g: Vec<usize> = got[r * 5..(r + 1) * 5]
            .iter()
            .map(|&v| v as usize)
            .collect();
        g.sort();
        assert_eq!(
            g,
            route_ref(&logits[r * 24..(r + 1) * 24], &bias, &cfg, true),
            "row {r}"
        );
    }
}

#[test]
fn config_validation_says_what_is_wrong() {
    let base = DeepseekV3Config::tiny();
    type Mutation = Box<dyn Fn(&mut DeepseekV3Config)>;
    let cases: Vec<(Mutation, &str)> = vec![
        (
            Box::new(|c| c.n_routed_experts = 15),
            "not divisible by n_group",
        ),
        (Box::new(|c| c.topk_group = 5), "topk_group"),
        (
            Box::new(|c| c.num_experts_per_tok = 9),
            "num_experts_per_tok",
        ),
        (Box::new(|c| c.qk_rope_head_dim = 7), "even"),
        (Box::new(|c| c.hidden_size = 0), "hidden_size"),
        (
            Box::new(|c| c.num_key_value_heads = Some(1)),
            "num_key_value_heads",
        ),
        (
            Box::new(|c| c.scoring_func = "softmax".into()),
            "scoring_func",
        ),
        (Box::new(|c| c.q_lora_rank = Some(0)), "q_lora_rank"),
    ];
    for (mutate, needle) in cases {
        let mut c = base.clone();
        mutate(&mut c);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains(needle), "{e:?} should mention {needle}");
        assert!(!e.contains('\n'), "one line: {e:?}");
    }
}

/// `config.json` of the released model parses, including `q_lora_rank: null` and both rope keys.
#[test]
fn config_json_variants_parse() {
    let released = r#"{"architectures":["DeepseekV3ForCausalLM"],"model_type":"deepseek_v3","vocab_size":129280,
      "hidden_size":7168,"intermediate_size":18432,"moe_intermediate_size":2048,"num_hidden_layers":61,
      "first_k_dense_replace":3,"moe_layer_freq":1,"num_attention_heads":128,"num_key_value_heads":128,
      "q_lora_rank":1536,"kv_lora_rank":512,"qk_nope_head_dim":128,"qk_rope_head_dim":64,"v_head_dim":128,
      "n_routed_experts":256,"n_shared_experts":1,"num_experts_per_tok":8,"n_group":8,"topk_group":4,
      "topk_method":"noaux_tc","scoring_func":"sigmoid","norm_topk_prob":true,"routed_scaling_factor":2.5,
      "seq_aux":true,"aux_loss_alpha":0.001,"ep_size":1,"hidden_act":"silu","rms_norm_eps":1e-06,
      "rope_theta":10000,"rope_scaling":{"beta_fast":32,"beta_slow":1,"factor":40,"mscale":1.0,
      "mscale_all_dim":1.0,"original_max_position_embeddings":4096,"type":"yarn"},
      "max_position_embeddings":163840,"num_nextn_predict_layers":1,"attention_bias":false,
      "attention_dropout":0.0,"tie_word_embeddings":false,"bos_token_id":0,"eos_token_id":1,
      "initializer_range":0.02,"pretraining_tp":1,"use_cache":true,"torch_dtype":"bfloat16",
      "quantization_config":{"activation_scheme":"dynamic","fmt":"e4m3","quant_method":"fp8","weight_block_size":[128,128]},
      "transformers_version":"4.33.1"}"#;
    let c: DeepseekV3Config = serde_json::from_str(released).unwrap();
    c.validate().unwrap();
    assert_eq!(c, {
        let mut p = DeepseekV3Config::deepseek_v3_671b();
        p.moe_layer_freq = Some(1);
        p.seq_aux = Some(true);
        p.aux_loss_alpha = Some(0.001);
        p.ep_size = Some(1);
        p.pretraining_tp = Some(1);
        p.use_cache = Some(true);
        p.transformers_version = Some("4.33.1".into());
        p
    });
    let direct: DeepseekV3Config = serde_json::from_str(
        r#"{"q_lora_rank":null,"rope_parameters":{"rope_type":"yarn","factor":4.0,"original_max_position_embeddings":16,"rope_theta":50000.0}}"#,
    )
    .unwrap();
    assert_eq!(direct.q_lora_rank, None);
    assert_eq!(direct.rope_base(), 50000.0);
    assert_eq!(direct.yarn().unwrap().factor, 4.0);
}
