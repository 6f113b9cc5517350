//! Comparing engine outputs with recorded references: the one error measure every parity test
//! states its bound in.

/// Relative L2 error of `got` against `want`, in f64: ‖got − want‖ / ‖want‖.
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - *w as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| (*w as f64).powi(2)).sum();
    (num / den).sqrt()
}

use std::path::{Path, PathBuf};

use safetensors::SafeTensors;
use serde_json::Value;

/// One recorded image/prompt pair of a fixture's cases.json.
pub struct Case {
    pub index: usize,
    pub image: PathBuf,
    pub prompt: String,
    pub input_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub json: Value,
}

impl Case {
    /// A list of integers from the case's JSON.
    pub fn ints(&self, key: &str) -> Vec<usize> {
        ids(&self.json[key])
            .into_iter()
            .map(|x| x as usize)
            .collect()
    }

    /// A list of integer lists from the case's JSON (e.g. kept patches per view).
    pub fn int_lists(&self, key: &str) -> Vec<Vec<usize>> {
        let lists = self.json[key].as_array();
        let lists = lists.unwrap_or_else(|| panic!("cases.json: {key} is not a list"));
        let list = |v: &Value| ids(v).into_iter().map(|x| x as usize).collect();
        lists.iter().map(list).collect()
    }

    pub fn int(&self, key: &str) -> usize {
        self.json[key].as_u64().unwrap() as usize
    }
}

/// An id list: cases.json stores lists either as JSON arrays or as their Python repr strings.
pub fn ids(v: &Value) -> Vec<u32> {
    match v {
        Value::Array(a) => a.iter().map(|x| x.as_u64().unwrap() as u32).collect(),
        Value::String(s) => serde_json::from_str::<Vec<u32>>(s).unwrap(),
        other => panic!("not an id list: {other}"),
    }
}

/// The cases of `dir`/cases.json (image paths relative to `dir`).
pub fn read_cases(dir: &Path) -> Vec<Case> {
    let text = std::fs::read_to_string(dir.join("cases.json")).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(index, c)| Case {
            index,
            image: dir.join(c["image"].as_str().unwrap()),
            prompt: c["prompt"].as_str().unwrap().to_string(),
            input_ids: ids(&c["input_ids"]),
            greedy_ids: ids(&c["greedy_ids"]),
            json: c.clone(),
        })
        .collect()
}

/// The float32 tensor `name` of the safetensors file at `path`.
pub fn read_tensor(path: &Path, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("reference tensor {name} missing from {}", path.display()));
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    bytemuck::pod_collect_to_vec(t.data())
}
