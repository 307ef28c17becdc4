//! CPU references of the policy family (`ntkv::policy`): WindowKV window selection,
//! LazyEviction's state and lagged eviction, PrefixKV's budgets. Exact index lists, worked
//! out by hand in the comments. Runs anywhere.

use ntkv::policy::cpu::{self, LazyEviction, WindowKvGroup};
use ntkv::policy::{Csr, LazyOptions, PrefixShape, WindowKvOptions};
use ntkv::rng::Rng;
use ntkv::topk::{AttnShape, GqaReduce};

fn wopts(window: usize, recent: usize, budget: usize) -> WindowKvOptions {
    WindowKvOptions { window, recent, budget, share_layers: 1 }
}

fn rows_of(csr: &Csr) -> Vec<Vec<u32>> {
    (0..csr.rows()).map(|r| csr.row(r).unwrap().to_vec()).collect()
}

#[test]
fn windowkv_keeps_the_best_windows_and_the_recent_window() {
    // t = 12, recent 2: older tokens 0..10 in windows [0,3) [3,6) [6,9) [9,10) (the last one
    // stops where the recent window starts). Sums 3, 5, 2, 4; budget 8 leaves 6 = 2 windows:
    // windows 1 and 3, then the recent tokens 10, 11.
    let scores = [1.0, 1.0, 1.0, 5.0, 0.0, 0.0, 0.0, 0.0, 2.0, 4.0f32];
    let csr = cpu::windowkv_select(&scores, 1, 12, &wopts(3, 2, 8)).unwrap();
    assert_eq!(csr.indptr, vec![0, 6]);
    assert_eq!(csr.indices, vec![3, 4, 5, 9, 10, 11]);
    assert_eq!(cpu::window_scores(&scores, 1, 10, 3).unwrap(), vec![3.0, 5.0, 2.0, 4.0]);
}

#[test]
fn windowkv_window_straddling_the_recent_window_is_clipped() {
    // t = 12, recent 3, w = 4: windows [0,4) [4,8) [8,9). The window that would straddle the
    // recent window holds only token 8, and its score is token 8's alone.
    let scores = [0.1, 0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.2, 3.0f32];
    assert_eq!(cpu::window_scores(&scores, 1, 9, 4).unwrap(), vec![0.4, 0.8, 3.0]);
    // budget 7: one window (4 tokens fit, not 8): the short window 2 wins on its sum.
    let csr = cpu::windowkv_select(&scores, 1, 12, &wopts(4, 3, 7)).unwrap();
    assert_eq!(csr.indices, vec![8, 9, 10, 11]);
    // budget 11: two windows: 2 and 1.
    let csr = cpu::windowkv_select(&scores, 1, 12, &wopts(4, 3, 11)).unwrap();
    assert_eq!(csr.indices, vec![4, 5, 6, 7, 8, 9, 10, 11]);
}

#[test]
fn windowkv_budget_below_one_window_keeps_only_the_recent_window() {
    let scores: Vec<f32> = (0..10).map(|i| i as f32).collect();
    // budget − recent = 3 < w = 4.
    let csr = cpu::windowkv_select(&scores, 1, 12, &wopts(4, 2, 5)).unwrap();
    assert_eq!(csr.indices, vec![10, 11]);
    // No recent window and no room for a window: an empty list.
    let csr = cpu::windowkv_select(&scores[..9], 1, 9, &wopts(4, 0, 3)).unwrap();
    assert_eq!(csr.indptr, vec![0, 0]);
}

#[test]
fn windowkv_ties_go_to_the_lower_window_and_nan_ranks_last() {
    let csr = cpu::windowkv_select(&[1.0f32; 12], 1, 14, &wopts(2, 2, 6)).unwrap();
    assert_eq!(csr.indices, vec![0, 1, 2, 3, 12, 13]);
    let mut scores = [1.0f32; 12];
    scores[0] = f32::NAN; // window 0 becomes NaN
    scores[2] = -5.0; // window 1 sums to -4
    let csr = cpu::windowkv_select(&scores, 1, 12, &wopts(2, 0, 8)).unwrap();
    assert_eq!(csr.indices, vec![4, 5, 6, 7, 8, 9, 10, 11]);
    let csr = cpu::windowkv_select(&scores, 1, 12, &wopts(2, 0, 10)).unwrap();
    assert_eq!(csr.indices, vec![2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
}

#[test]
fn windowkv_keeps_everything_that_fits_and_rows_are_independent() {
    // older = 5 ≤ budget − recent = 5: all windows, including the short one.
    let csr = cpu::windowkv_select(&[0.0f32; 5], 1, 7, &wopts(2, 2, 7)).unwrap();
    assert_eq!(csr.indices, (0..7).collect::<Vec<u32>>());
    // Two rows preferring different windows.
    let scores = [9.0, 9.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 8.0, 8.0f32];
    let csr = cpu::windowkv_select(&scores, 2, 7, &wopts(2, 1, 3)).unwrap();
    assert_eq!(rows_of(&csr), vec![vec![0, 1, 6], vec![4, 5, 6]]);
}

#[test]
fn windowkv_matches_a_brute_force_model() {
    let mut rng = Rng::new(14);
    for _ in 0..300 {
        let t = 1 + rng.below(80);
        let recent = rng.below(t + 1);
        let budget = recent.max(1) + rng.below(t - recent.max(1) + 1);
        let window = 1 + rng.below(9);
        let rows = 1 + rng.below(3);
        let older = t - recent;
        let scores: Vec<f32> = (0..rows * older).map(|_| (rng.below(5) as f32) * 0.25).collect();
        let o = wopts(window, recent, budget);
        let csr = cpu::windowkv_select(&scores, rows, t, &o).unwrap();
        for r in 0..rows {
            let row = csr.row(r).unwrap();
            assert!(row.len() <= budget, "list of {} > budget {budget}", row.len());
            assert!(row.windows(2).all(|w| w[0] < w[1]));
            assert!(row.ends_with(&(older as u32..t as u32).collect::<Vec<_>>()));
            // Brute force: sort windows by (sum desc, index asc) with exact sums.
            let nw = older.div_ceil(window);
            let sums: Vec<f32> = (0..nw)
                .map(|i| scores[r * older + i * window..r * older + ((i + 1) * window).min(older)].iter().sum())
                .collect();
            let mut order: Vec<usize> = (0..nw).collect();
            order.sort_by(|&a, &b| sums[b].partial_cmp(&sums[a]).unwrap().then(a.cmp(&b)));
            let m = if older <= budget - recent { nw } else { (budget - recent) / window };
            let mut want: Vec<u32> =
                order[..m].iter().flat_map(|&i| (i * window) as u32..((i + 1) * window).min(older) as u32).collect();
            want.sort_unstable();
            want.extend(older as u32..t as u32);
            assert_eq!(row, &want[..], "t {t} recent {recent} budget {budget} w {window}");
        }
    }
}

#[test]
fn windowkv_group_shares_the_leaders_lists() {
    let o = WindowKvOptions { window: 2, recent: 1, budget: 3, share_layers: 2 };
    assert!(o.is_leader(0) && !o.is_leader(1) && o.is_leader(2));
    let mut g = WindowKvGroup::new(o, 1, 7).unwrap();
    // A follower before any leader has selected is an error, not a stale list.
    assert!(g.select_layer(1, None).is_err());
    let l0 = g.select_layer(0, Some(&[5.0, 5.0, 0.0, 0.0, 0.0, 0.0])).unwrap().clone();
    assert_eq!(l0.indices, vec![0, 1, 6]);
    // Layer 1 reuses layer 0's lists and reads no scores.
    assert_eq!(g.select_layer(1, None).unwrap(), &l0);
    assert!(g.select_layer(2, None).is_err(), "a leader needs scores");
    let l2 = g.select_layer(2, Some(&[0.0, 0.0, 0.0, 0.0, 1.0, 1.0])).unwrap().clone();
    assert_eq!(l2.indices, vec![4, 5, 6]);
    assert_eq!(g.select_layer(3, None).unwrap(), &l2);
}

#[test]
fn windowkv_from_attention_uses_the_snapkv_votes() {
    let mut rng = Rng::new(3);
    let shape = AttnShape { hq: 4, hkv: 2, tq: 3, t: 20, d: 8 };
    let q: Vec<f32> = (0..shape.hq * shape.tq * shape.d).map(|_| rng.normal()).collect();
    let k: Vec<f32> = (0..shape.hkv * shape.t * shape.d).map(|_| rng.normal()).collect();
    let o = wopts(4, 3, 11);
    let got = cpu::windowkv_select_attn(&q, &k, shape, &o, GqaReduce::Sum).unwrap();
    let votes: Vec<f32> =
        ntkv::topk::cpu::snapkv_votes(&q, &k, shape, GqaReduce::Sum).unwrap().into_iter().map(|v| v as f32).collect();
    assert_eq!(got, cpu::windowkv_select(&votes, 2, 20, &o).unwrap());
    assert!(cpu::windowkv_select_attn(&q, &k, shape, &wopts(4, 2, 11), GqaReduce::Sum).is_err());
}

#[test]
fn lazy_state_over_a_scripted_attention_sequence() {
    // One head, four tokens, threshold 0.5, all entered at step 0.
    let (hkv, t, th) = (1, 4, 0.5f32);
    let (mut acc, mut last_hit, mut mri) = (vec![0.0f32; 4], vec![0.0f32; 4], vec![0.0f32; 4]);
    let script = [
        [0.6, 0.1, 0.0, 0.9], // step 0: hits 0, 3 (intervals 0)
        [0.1, 0.7, 0.1, 0.1], // step 1: hit 1 (interval 1)
        [0.0, 0.0, 0.0, 0.5], // step 2: hit 3 (interval 2: the threshold counts)
        [0.8, 0.0, 0.0, 0.0], // step 3: hit 0 (interval 3)
        [0.0, 0.0, 0.5, 0.0], // step 4: hit 2 (interval 4, since step 0)
    ];
    for (s, p) in script.iter().enumerate() {
        cpu::lazy_update(p, &mut acc, &mut last_hit, &mut mri, hkv, t, s, th).unwrap();
    }
    assert_eq!(last_hit, vec![3.0, 1.0, 4.0, 2.0]);
    assert_eq!(mri, vec![3.0, 1.0, 4.0, 2.0]);
    let want_acc: Vec<f32> = (0..4).map(|j| script.iter().fold(0.0f32, |a, p| a + p[j])).collect();
    assert_eq!(acc, want_acc);
    // Scores at step 4: mri − (4 − last_hit) = [2, −2, 4, 0].
    assert_eq!(cpu::lazy_scores(&last_hit, &mri, hkv, t, 4).unwrap(), vec![2.0, -2.0, 4.0, 0.0]);
    // Budget 3, recent 1: the best two of tokens 0..3 by score are 2 and 0, then token 3.
    assert_eq!(cpu::lazy_select(&last_hit, &mri, hkv, t, 4, 3, 1).unwrap(), vec![0, 2, 3]);
    // Budget 2, recent 0: tokens 2 and 0 again; budget 3, recent 0: token 3 (score 0) joins.
    assert_eq!(cpu::lazy_select(&last_hit, &mri, hkv, t, 4, 2, 0).unwrap(), vec![0, 2]);
    assert_eq!(cpu::lazy_select(&last_hit, &mri, hkv, t, 4, 3, 0).unwrap(), vec![0, 2, 3]);
    // Ties go to the lower index: a fresh state scores every token 0.
    let flat = vec![0.0f32; 4];
    assert_eq!(cpu::lazy_select(&flat, &flat, 1, 4, 0, 2, 0).unwrap(), vec![0, 1]);
}

/// Drives a one-head, `d = 1` cache whose key of token `i` is `i`: step `s` appends token
/// `3 + s`, then attends with `hits(s)` (token ids that get mass 0.6; others get 0.2).
fn drive(lag: usize, steps: usize, hits: impl Fn(usize) -> Vec<u32>) -> (LazyEviction<f32>, Vec<usize>) {
    let o = LazyOptions { budget: 3, recent: 1, lag, threshold: 0.5 };
    let mut c = LazyEviction::new(o, 1, 3, 1, vec![0.0, 1.0, 2.0], vec![0.0, -1.0, -2.0]).unwrap();
    let mut evicted_at = Vec::new();
    for s in 0..steps {
        let id = (3 + s) as f32;
        c.append(&[id], &[-id]).unwrap();
        let h = hits(s);
        let p: Vec<f32> = c.k().iter().map(|&k| if h.contains(&(k as u32)) { 0.6 } else { 0.2 }).collect();
        if c.decode_step(&p).unwrap().is_some() {
            evicted_at.push(s);
        }
        let neg: Vec<f32> = c.k().iter().map(|k| -k).collect();
        assert_eq!(c.v(), &neg[..], "V moves with K");
    }
    (c, evicted_at)
}

fn script(s: usize) -> Vec<u32> {
    match s {
        0 => vec![0],
        1 => vec![1, 3],
        _ => vec![],
    }
}

#[test]
fn lazy_eviction_lag_1_evicts_every_step() {
    // Step 0: tokens 0..=3, token 0 hit (interval 0). Scores [0, 0, 0 | 3 recent]: tokens 0, 1
    // win on index -> [0, 1, 3]. Step 1: [0, 1, 3, 4], hits 1 and 3 (intervals 1): scores
    // [−1, 1, 1] -> [1, 3, 4]. Step 2: [1, 3, 4, 5], no hits: last_hit [1, 1, 1], mri
    // [1, 1, 0]: scores [0, 0, −1] -> [1, 3, 5].
    let (c, at) = drive(1, 3, script);
    assert_eq!(at, vec![0, 1, 2]);
    assert_eq!(c.k(), &[1.0, 3.0, 5.0]);
    assert_eq!(c.last_hit(), &[1.0, 1.0, 2.0]);
    assert_eq!(c.mri(), &[1.0, 1.0, 0.0]);
    assert_eq!(c.acc(), &[0.2 + 0.6 + 0.2f32, 0.2 + 0.6 + 0.2, 0.2]);
}

#[test]
fn lazy_eviction_lag_8_waits_and_then_evicts_once() {
    // Nothing is evicted before step 7; the cache grows to 11 tokens. At step 7 the scores
    // mri − (7 − last_hit) of tokens 0..=9 are [−7, −5, −7, −5, −6, −5, −4, −3, −2, −1], so
    // tokens 9 and 8 win, then the recent token 10.
    let (c, at) = drive(8, 8, script);
    assert_eq!(at, vec![7]);
    assert_eq!(c.k(), &[8.0, 9.0, 10.0]);
    assert_eq!(c.last_hit(), &[5.0, 6.0, 7.0]);
    let (c, at) = drive(8, 7, script);
    assert!(at.is_empty());
    assert_eq!(c.len(), 10);
    assert_eq!(c.mri()[..4], [0.0, 1.0, 0.0, 1.0]);
}

#[test]
fn prefixkv_worked_example() {
    // Row 0 [1, 4, 2, 3] sorts to tokens [1, 3, 2, 0], masses 4, 3, 2, 1 of 10: thresholds
    // [0, .4, .7, .9]. Row 1 [1, 1, 1, 1]: [0, .25, .5, .75]. The 5 lowest (e, row, i):
    // (0,0,0) (0,1,0) (.25,1,1) (.4,0,1) (.5,1,2): budgets [2, 3], ratio 0.5.
    let imp = [1.0, 4.0, 2.0, 3.0, 1.0, 1.0, 1.0, 1.0f32];
    let shape = PrefixShape { rows: 2, n: 4, budget: 5 };
    let r = cpu::prefixkv(&imp, &shape).unwrap();
    assert_eq!(r.budgets, vec![2, 3]);
    assert_eq!(r.ratio, 0.5);
    assert_eq!(rows_of(&r.keep), vec![vec![1, 3], vec![0, 1, 2]]);
    let (v, _) = cpu::prefix_sort(&imp, &shape).unwrap();
    assert_eq!(cpu::prefix_thresholds(&v, 2, 4).unwrap(), vec![0.0, 0.4, 0.7, 0.9, 0.0, 0.25, 0.5, 0.75]);
}

#[test]
fn prefixkv_ties_fill_the_lower_rows_first_and_massless_rows_wait() {
    let r = cpu::prefixkv(&[1.0, 1.0, 1.0, 1.0], &PrefixShape { rows: 2, n: 2, budget: 3 }).unwrap();
    assert_eq!((r.budgets.clone(), r.ratio), (vec![2, 1], 0.5));
    // A row without mass (zeros, a negative, NaN) keeps one token until every row with mass
    // reaches ratio 1.
    let imp = [0.0, -1.0, f32::NAN, 1.0, 1.0, 1.0];
    let r = cpu::prefixkv(&imp, &PrefixShape { rows: 2, n: 3, budget: 4 }).unwrap();
    assert_eq!(r.budgets, vec![1, 3]);
    assert_eq!(rows_of(&r.keep), vec![vec![0], vec![0, 1, 2]]);
    let r = cpu::prefixkv(&imp, &PrefixShape { rows: 2, n: 3, budget: 6 }).unwrap();
    assert_eq!(r.budgets, vec![3, 3]);
}

#[test]
fn prefixkv_budgets_sum_to_the_global_budget() {
    let mut rng = Rng::new(9);
    for case in 0..200 {
        let rows = 1 + rng.below(6);
        let n = 1 + rng.below(if case % 10 == 0 { 3000 } else { 40 });
        let budget = 1 + rng.below(rows * n);
        let imp: Vec<f32> = (0..rows * n).map(|_| if rng.below(4) == 0 { 0.0 } else { rng.uniform() }).collect();
        let shape = PrefixShape { rows, n, budget };
        let r = cpu::prefixkv(&imp, &shape).unwrap();
        assert_eq!(r.budgets.iter().map(|&b| b as usize).sum::<usize>(), budget);
        let (_, order) = cpu::prefix_sort(&imp, &shape).unwrap();
        let (v, _) = cpu::prefix_sort(&imp, &shape).unwrap();
        let e = cpu::prefix_thresholds(&v, rows, n).unwrap();
        for rr in 0..rows {
            let b = r.budgets[rr] as usize;
            // A prefix of the sorted order, ascending.
            let mut want = order[rr * n..rr * n + b].to_vec();
            want.sort_unstable();
            assert_eq!(r.keep.row(rr).unwrap(), &want[..]);
            // Every entry strictly below the ratio is kept, nothing above it is.
            let row = &e[rr * n..(rr + 1) * n];
            assert!(row[..b].iter().all(|&x| x <= r.ratio));
            assert!(row[b..].iter().all(|&x| x >= r.ratio));
            assert!(row.windows(2).all(|w| w[0] <= w[1]));
            // The fixed-order sum stays within rounding of a plain sequential one.
            let total: f64 = v[rr * n..(rr + 1) * n].iter().map(|&x| cpu::prefix_mass(x)).sum();
            if total > 0.0 && n > 1 {
                let seq = v[rr * n..rr * n + n - 1].iter().map(|&x| cpu::prefix_mass(x)).sum::<f64>() / total;
                assert!((row[n - 1] - seq).abs() < 1e-12, "{} vs {seq}", row[n - 1]);
            }
        }
    }
}
