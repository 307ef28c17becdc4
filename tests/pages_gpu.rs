//! The pages kernels on the GPU against the CPU references, bit for bit: Quest metadata
//! (build and incremental append, partial pages), Quest selection (pages and CSR lists),
//! ShadowKV landmarks, cosines and outliers, and the landmark selection; GQA groups 1, 3 and
//! 8, T not a page or chunk multiple, budgets below the kept pages, tied keys; bad buffers
//! rejected with nothing written; the same bits run after run.

mod common;
mod pages_support;

use half::{bf16, f16};
use ntkv::pages::{
    cpu, LandmarkPlan, LandmarkSelectPlan, LandmarkSelectShape, QuestMetaPlan, QuestSelectPlan, QuestSelectShape,
};
use ntkv::rng::Rng;
use ntkv::{Device, DeviceTensor, Error, Float};
use pages_support::{landmark_problem, lshape, qshape, quest_problem, run_cases, Case, Checks, Keys, Ty};

fn bits<T: Float>(x: &[T]) -> Vec<u32> {
    x.iter().map(|v| v.to_f32().to_bits()).collect()
}

fn fbits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

struct Csr {
    blocks: Vec<u32>,
    indptr: Vec<u32>,
    indices: Vec<u32>,
}

fn csr_out(dev: &Device, rows: usize, cap: usize) -> Result<(DeviceTensor<u32>, DeviceTensor<u32>), Error> {
    Ok((DeviceTensor::zeros(dev, &[rows + 1])?, DeviceTensor::zeros(dev, &[cap.max(1)])?))
}

/// Reads a selection back: the blocks, `indptr`, and the used prefix of `indices`.
fn fetch(
    blocks: &DeviceTensor<u32>,
    ip: &DeviceTensor<u32>,
    ix: &DeviceTensor<u32>,
    rows: usize,
) -> Result<Csr, Error> {
    let indptr = ip.to_host()?;
    let mut indices = ix.to_host()?;
    indices.truncate(indptr[rows] as usize);
    Ok(Csr { blocks: blocks.to_host()?, indptr, indices })
}

/// The GPU selection equals the CPU reference: blocks (named `blocks`), `indptr`, `indices`.
fn assert_selection(got: &Csr, want: &cpu::Selection, blocks: &str, s: &dyn std::fmt::Debug) {
    assert_eq!(got.blocks, want.blocks, "{blocks} of {s:?}");
    assert_eq!(got.indptr, want.indptr, "indptr of {s:?}");
    assert_eq!(got.indices, want.indices, "indices of {s:?}");
}

fn quest_gpu<T: Float>(
    dev: &Device,
    s: &QuestSelectShape,
    keys: &[T],
    lens: &[u32],
    q: &[T],
) -> Result<(Vec<T>, Vec<T>, Csr), Error> {
    let meta = s.meta();
    let k = DeviceTensor::from_host(dev, keys, &meta.keys_shape())?;
    let mut mx = DeviceTensor::<T>::zeros(dev, &meta.meta_shape())?;
    let mut mn = DeviceTensor::<T>::zeros(dev, &meta.meta_shape())?;
    let mut mp = QuestMetaPlan::new(dev, &meta)?;
    // Build from half the lengths, then append the rest: the incremental path.
    let half: Vec<u32> = lens.iter().map(|&l| l / 2 + 1).map(|l| l.min(s.capacity as u32)).collect();
    let full: Vec<u32> = lens.iter().zip(&half).map(|(&l, &h)| l.max(h)).collect();
    mp.build(&k, &half, &mut mx, &mut mn)?;
    mp.append(&k, &half, &full, &mut mx, &mut mn)?;
    let qd = DeviceTensor::from_host(dev, q, &s.q_shape())?;
    let mut pages = DeviceTensor::<u32>::zeros(dev, &s.pages_shape())?;
    let (mut ip, mut ix) = csr_out(dev, s.rows(), s.capacity_tokens()?)?;
    let mut plan = QuestSelectPlan::new(dev, s)?;
    plan.run(&qd, &mx, &mn, &full, &mut pages, &mut ip, &mut ix)?;
    Ok((mx.to_host()?, mn.to_host()?, fetch(&pages, &ip, &ix, s.rows())?))
}

fn check_quest<T: Float>((dev, seed): Ctx, s: QuestSelectShape, keys: Keys) {
    let mut rng = Rng::new(seed);
    let p = quest_problem::<T>(&mut rng, &s, keys, true);
    let (gmx, gmn, got) = quest_gpu(dev, &s, &p.keys, &p.lens, &p.q).unwrap();
    let half: Vec<u32> = p.lens.iter().map(|&l| (l / 2 + 1).min(s.capacity as u32)).collect();
    let full: Vec<u32> = p.lens.iter().zip(&half).map(|(&l, &h)| l.max(h)).collect();
    let (mx, mn) = cpu::quest_meta(&s.meta(), &p.keys, &full).unwrap();
    assert_eq!(bits(&gmx), bits(&mx), "page_max of {s:?}");
    assert_eq!(bits(&gmn), bits(&mn), "page_min of {s:?}");
    let want = cpu::quest_select(&s, &p.q, &mx, &mn, &full).unwrap();
    assert_selection(&got, &want, "pages", &s);
}

/// A landmark build and selection read back: landmarks, min_cos, outliers, the selection.
type LandmarkRun = (Vec<f32>, Vec<f32>, Vec<u32>, Csr);

fn landmark_gpu<T: Float>(
    dev: &Device,
    s: &LandmarkSelectShape,
    keys: &[T],
    lens: &[u32],
    q: &[T],
) -> Result<LandmarkRun, Error> {
    let ls = s.landmarks();
    let k = DeviceTensor::from_host(dev, keys, &ls.keys_shape())?;
    let mut lm = DeviceTensor::<f32>::zeros(dev, &ls.landmarks_shape())?;
    let mut mc = DeviceTensor::<f32>::zeros(dev, &ls.cos_shape())?;
    let mut outl = DeviceTensor::<u32>::zeros(dev, &[ls.rows(), ls.outliers.max(1)])?;
    if ls.outliers > 0 {
        outl = outl.reshape(&ls.outliers_shape())?;
    }
    LandmarkPlan::new(dev, &ls)?.run(&k, lens, &mut lm, &mut mc, &mut outl)?;
    let qd = DeviceTensor::from_host(dev, q, &s.q_shape())?;
    let mut chunks = DeviceTensor::<u32>::zeros(dev, &s.chunks_shape())?;
    let (mut ip, mut ix) = csr_out(dev, s.rows(), s.capacity_tokens()?)?;
    let mut plan = LandmarkSelectPlan::new(dev, s)?;
    plan.run(&qd, &lm, &outl, lens, &mut chunks, &mut ip, &mut ix)?;
    let outs = if ls.outliers > 0 { outl.to_host()? } else { Vec::new() };
    Ok((lm.to_host()?, mc.to_host()?, outs, fetch(&chunks, &ip, &ix, s.rows())?))
}

fn check_landmarks<T: Float>((dev, seed): Ctx, s: LandmarkSelectShape, keys: Keys) {
    let mut rng = Rng::new(seed);
    let p = landmark_problem::<T>(&mut rng, &s, keys, true);
    let (glm, gmc, gout, got) = landmark_gpu(dev, &s, &p.keys, &p.lens, &p.q).unwrap();
    let want = cpu::landmarks(&s.landmarks(), &p.keys, &p.lens).unwrap();
    assert_eq!(fbits(&glm), fbits(&want.landmarks), "landmarks of {s:?}");
    assert_eq!(fbits(&gmc), fbits(&want.min_cos), "min_cos of {s:?}");
    assert_eq!(gout, want.outliers, "outliers of {s:?}");
    let sel = cpu::landmark_select(&s, &p.q, &want.landmarks, &want.outliers, &p.lens).unwrap();
    assert_selection(&got, &sel, "chunks", &s);
}

/// A GPU case's context: the device and the seed.
type Ctx = (&'static Device, u64);

/// Runs the `(type, case)` table against the references, each case seeded by its position.
fn differential(dev: &'static Device, table: &[(Ty, Case)]) {
    let cases: Vec<_> = table.iter().enumerate().map(|(i, &(ty, case))| (ty, (dev, i as u64 + 1), case)).collect();
    let quest: Checks<Ctx, QuestSelectShape> = [check_quest::<f32>, check_quest::<f16>, check_quest::<bf16>];
    let landmark: Checks<Ctx, LandmarkSelectShape> =
        [check_landmarks::<f32>, check_landmarks::<f16>, check_landmarks::<bf16>];
    run_cases(&cases, quest, landmark);
}

#[test]
fn selection_differential() {
    let dev = gpu_or_skip!("selection_differential");
    differential(
        dev,
        &[
            (Ty::F16, Case::Quest(qshape(2, 8, 8, 1, 128, 1000, 16, 8), Keys::Normal)),
            (Ty::Bf16, Case::Quest(qshape(3, 6, 2, 2, 64, 777, 16, 5), Keys::Normal)),
            (Ty::F32, Case::Quest(qshape(2, 8, 1, 4, 96, 333, 16, 1000), Keys::Normal)),
            (Ty::F16, Case::Quest(qshape(2, 3, 1, 1, 40, 129, 7, 1), Keys::Normal)),
            (Ty::F16, Case::Quest(qshape(4, 16, 2, 16, 256, 300, 32, 4), Keys::Normal)),
            (Ty::F16, Case::Landmark(lshape(2, 8, 8, 1, 128, 1001, 4, 16), Keys::Normal)),
            (Ty::Bf16, Case::Landmark(lshape(3, 6, 2, 3, 64, 613, 2, 7), Keys::Normal)),
            (Ty::F32, Case::Landmark(lshape(2, 8, 1, 2, 24, 99, 1, 100), Keys::Normal)),
            (Ty::F16, Case::Landmark(lshape(2, 3, 1, 1, 8, 70, 0, 1), Keys::Normal)),
        ],
    );
}

#[test]
fn selection_differential_with_ties() {
    let dev = gpu_or_skip!("selection_differential_with_ties");
    // Every shape under both kinds of tied keys.
    for keys in [Keys::AllEqual, Keys::Coarse] {
        differential(
            dev,
            &[
                (Ty::F16, Case::Quest(qshape(1, 32, 8, 1, 128, 4100, 16, 64), keys)),
                (Ty::Bf16, Case::Quest(qshape(2, 4, 4, 1, 8, 64, 16, 3), keys)),
                (Ty::F16, Case::Landmark(lshape(1, 4, 2, 1, 128, 256, 3, 4), keys)),
                (Ty::F16, Case::Landmark(lshape(1, 32, 8, 16, 128, 5000, 8, 32), keys)),
            ],
        );
    }
}

#[test]
fn bad_buffers_write_nothing() {
    let dev = gpu_or_skip!("bad_buffers_write_nothing");
    let s = qshape(2, 4, 2, 1, 16, 40, 16, 2);
    let meta = s.meta();
    let keys = DeviceTensor::<f16>::zeros(dev, &meta.keys_shape()).unwrap();
    let sentinel = vec![f16::from_f32(7.0); 2 * 2 * 3 * 16];
    let mut mx = DeviceTensor::from_host(dev, &sentinel, &meta.meta_shape()).unwrap();
    let mut mn = DeviceTensor::<f16>::zeros(dev, &[2, 2, 2, 16]).unwrap();
    let mut mp = QuestMetaPlan::new(dev, &meta).unwrap();
    assert!(matches!(mp.build(&keys, &[40, 40], &mut mx, &mut mn), Err(Error::Shape { arg: "page_min", .. })));
    let mut mn = DeviceTensor::<f16>::zeros(dev, &meta.meta_shape()).unwrap();
    assert!(matches!(mp.build(&keys, &[41, 40], &mut mx, &mut mn), Err(Error::InvalidArgument { arg: "lens", .. })));
    assert!(matches!(
        mp.append(&keys, &[30, 0], &[20, 0], &mut mx, &mut mn),
        Err(Error::InvalidArgument { arg: "lens", .. })
    ));
    assert_eq!(mx.to_host().unwrap(), sentinel);

    let q = DeviceTensor::<f16>::zeros(dev, &s.q_shape()).unwrap();
    let mut pages = DeviceTensor::from_host(dev, &[9u32; 8], &s.pages_shape()).unwrap();
    let mut ip = DeviceTensor::from_host(dev, &[9u32; 5], &[5]).unwrap();
    let mut short = DeviceTensor::from_host(dev, &[9u32; 3], &[3]).unwrap();
    let mut plan = QuestSelectPlan::new(dev, &s).unwrap();
    let e = plan.run(&q, &mx, &mn, &[40, 40], &mut pages, &mut ip, &mut short).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "indices", .. }), "{e:?}");
    assert_eq!(pages.to_host().unwrap(), vec![9; 8]);
    assert_eq!(ip.to_host().unwrap(), vec![9; 5]);
}

#[test]
fn deterministic_and_reusable() {
    let dev = gpu_or_skip!("deterministic_and_reusable");
    let s = lshape(2, 8, 2, 2, 128, 2000, 4, 32);
    let mut rng = Rng::new(99);
    let p = landmark_problem::<bf16>(&mut rng, &s, Keys::Normal, false);
    let a = landmark_gpu(dev, &s, &p.keys, &p.lens, &p.q).unwrap();
    let b = landmark_gpu(dev, &s, &p.keys, &p.lens, &p.q).unwrap();
    assert_eq!(fbits(&a.0), fbits(&b.0));
    assert_eq!(a.3.indices, b.3.indices);
    let qs = qshape(2, 8, 2, 1, 128, 2000, 16, 16);
    let p = quest_problem::<f16>(&mut rng, &qs, Keys::Normal, false);
    let x = quest_gpu(dev, &qs, &p.keys, &p.lens, &p.q).unwrap();
    let y = quest_gpu(dev, &qs, &p.keys, &p.lens, &p.q).unwrap();
    assert_eq!(x.2.blocks, y.2.blocks);
    assert_eq!(x.2.indices, y.2.indices);
}
