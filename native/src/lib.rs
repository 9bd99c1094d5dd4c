//! weir's native hot path (see `weir.native` for the Python side and the contract).
//!
//! One `Windows` per partition task of a declarative tumbling- or sliding-window pipeline. `run`
//! takes a consumed batch of message values and folds the records it can certify into a
//! write-back cache of window accumulators: decode the needed fields, filter, event time, key,
//! windows, lateness, aggregate, per record and in order, building no Python object per record. It
//! stops at a record that is late (the caller dead-letters it) or that it cannot certify (the
//! caller runs it through the Python path, after `evict` hands over that window). `flush`
//! writes every changed window back to the Python store; the caller does so before windows
//! fire and before any checkpoint, so the store is the truth between batches.
//!
//! A pipeline with Python functions runs them per record in Python; its window segment still
//! runs here: `accept` folds one prepared record (a dict) the same way, reading only the fields
//! the aggregates need. Stage 2 of a job keyed by a record field folds the repartition topic's
//! forwarded records (`run_forwarded`), at the upstream watermark its caller keeps.

mod fetch;
mod json;
mod num;

use fetch::Fetch;
use json::{scan, scan_forwarded, Val};
use num::{add, cmp, Num};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use rustc_hash::FxHashMap;
use std::cmp::Ordering;

const MAX_EVENT_TIME_MS: i64 = 253_402_300_800_000;

/// Fields one pipeline may read natively (more: the Python path runs it).
const MAX_FIELDS: usize = 16;

const DONE: u8 = 0;
const LATE: u8 = 1;
const FALLBACK: u8 = 2;
/// A watermark marker on the repartition topic (no message key): the caller applies it.
const MARKER: u8 = 3;

/// What `Windows::step` did with a record: done, or stop at it with `(code, late_ts, late_wm)`.
enum Step {
    Next,
    Stop(u8, i64, i64),
}

/// The watermarks `run` carries from record to record (and a buffer for int keys).
struct Marks {
    task: i64,
    op: i64,
    keybuf: String,
}

#[derive(Clone, Copy)]
enum Op {
    Lt,
    Le,
    Gt,
    Ge,
}

impl Op {
    fn holds(self, o: Ordering) -> bool {
        match self {
            Op::Lt => o == Ordering::Less,
            Op::Le => o != Ordering::Greater,
            Op::Gt => o == Ordering::Greater,
            Op::Ge => o != Ordering::Less,
        }
    }
}

enum Cond {
    And(Vec<Cond>),
    Or(Vec<Cond>),
    Not(Box<Cond>),
    Exists(usize),
    EqNull(usize),
    EqBool(usize, bool),
    EqStr(usize, Box<str>),
    EqNum(usize, Num),
    In { f: usize, strs: Vec<Box<str>>, nums: Vec<Num>, bools: Vec<bool>, null: bool },
    CmpStr(usize, Op, Box<str>),
    CmpNum(usize, Op, Num),
}

fn as_num(v: Val) -> Option<Num> {
    match v {
        Val::Int(i) => Some(Num::Int(i)),
        Val::Float(f) => Some(Num::Float(f)),
        _ => None,
    }
}

impl Cond {
    /// The condition's value with Python's semantics of `weir.records` (see `Condition`).
    fn eval(&self, vals: &[Val]) -> bool {
        match self {
            Cond::And(cs) => cs.iter().all(|c| c.eval(vals)),
            Cond::Or(cs) => cs.iter().any(|c| c.eval(vals)),
            Cond::Not(c) => !c.eval(vals),
            Cond::Exists(f) => vals[*f] != Val::Missing,
            Cond::EqNull(f) => vals[*f] == Val::Null,
            Cond::EqBool(f, b) => vals[*f] == Val::Bool(*b),
            Cond::EqStr(f, s) => matches!(vals[*f], Val::Str(v) if v == &**s),
            Cond::EqNum(f, n) => as_num(vals[*f]).is_some_and(|v| cmp(v, *n) == Some(Ordering::Equal)),
            Cond::In { f, strs, nums, bools, null } => match vals[*f] {
                Val::Str(v) => strs.iter().any(|s| &**s == v),
                Val::Int(_) | Val::Float(_) => {
                    let v = as_num(vals[*f]).unwrap();
                    nums.iter().any(|n| cmp(v, *n) == Some(Ordering::Equal))
                }
                Val::Bool(b) => bools.contains(&b),
                Val::Null => *null,
                Val::Missing | Val::Other => false,
            },
            Cond::CmpStr(f, op, s) => matches!(vals[*f], Val::Str(v) if op.holds(v.cmp(&**s))),
            Cond::CmpNum(f, op, n) => as_num(vals[*f]).is_some_and(|v| cmp(v, *n).is_some_and(|o| op.holds(o))),
        }
    }
}

fn num_of(v: &Bound<PyAny>) -> PyResult<Num> {
    if v.is_instance_of::<PyBool>() {
        return Err(PyValueError::new_err("a boolean is not a number here"));
    }
    if v.is_instance_of::<PyInt>() {
        return Ok(Num::Int(v.extract()?));
    }
    if v.is_instance_of::<PyFloat>() {
        return Ok(Num::Float(v.extract()?));
    }
    Err(PyValueError::new_err("expected a number"))
}

fn cond_of(c: &Bound<PyAny>) -> PyResult<Cond> {
    let t = c.downcast::<PyTuple>()?;
    let kind: String = t.get_item(0)?.extract()?;
    let list = |i: usize| -> PyResult<Vec<Cond>> { t.get_item(i)?.try_iter()?.map(|x| cond_of(&x?)).collect() };
    Ok(match kind.as_str() {
        "and" => Cond::And(list(1)?),
        "or" => Cond::Or(list(1)?),
        "not" => Cond::Not(Box::new(cond_of(&t.get_item(1)?)?)),
        "exists" => Cond::Exists(t.get_item(1)?.extract()?),
        "eq" => {
            let f: usize = t.get_item(1)?.extract()?;
            let v = t.get_item(2)?;
            if v.is_none() {
                Cond::EqNull(f)
            } else if v.is_instance_of::<PyBool>() {
                Cond::EqBool(f, v.extract()?)
            } else if let Ok(s) = v.extract::<String>() {
                Cond::EqStr(f, s.into())
            } else {
                Cond::EqNum(f, num_of(&v)?)
            }
        }
        "in" => {
            let f: usize = t.get_item(1)?.extract()?;
            let (mut strs, mut nums, mut bools, mut null) = (vec![], vec![], vec![], false);
            for v in t.get_item(2)?.try_iter()? {
                let v = v?;
                if v.is_none() {
                    null = true;
                } else if v.is_instance_of::<PyBool>() {
                    bools.push(v.extract()?);
                } else if let Ok(s) = v.extract::<String>() {
                    strs.push(s.into());
                } else {
                    nums.push(num_of(&v)?);
                }
            }
            Cond::In { f, strs, nums, bools, null }
        }
        "lt" | "le" | "gt" | "ge" => {
            let op = match kind.as_str() {
                "lt" => Op::Lt,
                "le" => Op::Le,
                "gt" => Op::Gt,
                _ => Op::Ge,
            };
            let f: usize = t.get_item(1)?.extract()?;
            let v = t.get_item(2)?;
            if let Ok(s) = v.extract::<String>() {
                Cond::CmpStr(f, op, s.into())
            } else {
                Cond::CmpNum(f, op, num_of(&v)?)
            }
        }
        other => return Err(PyValueError::new_err(format!("unknown condition {other:?}"))),
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Agg {
    Count,
    Sum,
    Min,
    Max,
    Avg,
}

enum Time {
    Kafka,
    Millis(usize),
    Seconds(usize),
    /// Stage 2 of a repartitioned job: in the forwarded value (`run_forwarded`).
    Forwarded,
}

enum Key {
    Message,
    Field(usize),
}

type Slots = Vec<Option<Num>>;

struct Entry {
    start: i64,
    slots: Slots,
    dirty: bool,
    new: bool,
}

/// The window accumulators of one partition task's tumbling or sliding windows (tumbling:
/// `slide == size`); see the module docs.
#[pyclass(module = "weir_native")]
struct Windows {
    size: i64,
    slide: i64,
    lateness_m1: i64,
    ooo: i64,
    max_bytes: usize,
    cache_limit: usize,
    fields: Vec<Box<str>>,
    /// The same names as Python strings (`accept` reads them from dicts).
    py_fields: Vec<Py<PyString>>,
    time: Time,
    key: Key,
    filter: Option<Cond>,
    aggs: Vec<(Agg, Option<usize>)>,
    n_slots: usize,
    /// Per key, its cached windows sorted by start.
    cache: FxHashMap<Box<str>, Vec<Entry>>,
    cached: usize,
    min_end: i64,
    dirty: Vec<(Box<str>, i64)>,
    /// `fold_sliding`'s positions of one record's windows (kept to reuse the allocation).
    scratch: Vec<usize>,
    /// Records `run` finished itself (accepted, filtered or late) and their bytes, since `take_counts`.
    handled: u64,
    nbytes: u64,
}

fn slots_to_py<'py>(py: Python<'py>, slots: &Slots) -> PyResult<Bound<'py, PyList>> {
    let items: Vec<PyObject> = slots
        .iter()
        .map(|s| match s {
            None => py.None(),
            Some(Num::Int(i)) => i.into_pyobject(py).unwrap().into_any().unbind(),
            Some(Num::Float(f)) => PyFloat::new(py, *f).into_any().unbind(),
        })
        .collect();
    PyList::new(py, items)
}

impl Windows {
    /// The tumbling window of `key` starting at `start`: false (nothing applied) when its stored
    /// accumulator is not one this side folds, or the fold would overflow (Python decides).
    fn fold_tumbling(&mut self, key: &str, start: i64, vals: &[Val], loader: &Bound<PyAny>) -> PyResult<bool> {
        let end = start + self.size;
        if let Some(e) = self.cache.get_mut(key).and_then(|ws| find(ws, start).ok().map(|i| &mut ws[i])) {
            if !fold(&self.aggs, &mut e.slots, vals) {
                return Ok(false);
            }
            if !e.dirty {
                e.dirty = true;
                self.dirty.push((key.into(), start));
            }
            return Ok(true);
        }
        let loaded = loader.call1((key, start, end))?;
        let base = if loaded.is_none() {
            Some((create_slots(&self.aggs, self.n_slots), true))
        } else {
            slots_of(self.n_slots, &loaded).map(|s| (s, false))
        };
        let Some((mut slots, new)) = base else { return Ok(false) };
        if !fold(&self.aggs, &mut slots, vals) {
            return Ok(false);
        }
        let ws = self.cache.entry(key.into()).or_default();
        let at = find(ws, start).unwrap_or_else(|i| i);
        ws.insert(at, Entry { start, slots, dirty: true, new });
        self.cached += 1;
        self.min_end = self.min_end.min(end);
        self.dirty.push((key.into(), start));
        Ok(true)
    }

    /// The sliding windows of `key` from `first` to `t` (every `slide`), as the Python path adds
    /// to them: all or none. False (nothing applied) when a window's accumulator is not what
    /// this side can fold, or a fold would overflow in any of them: Python decides then.
    fn fold_sliding(&mut self, key: &str, t: i64, first: i64, vals: &[Val], loader: &Bound<PyAny>) -> PyResult<bool> {
        let (size, slide, n_slots) = (self.size, self.slide, self.n_slots);
        if !self.cache.contains_key(key) {
            self.cache.insert(key.into(), Vec::new());
        }
        let ws = self.cache.get_mut(key).expect("inserted above");
        let pos = &mut self.scratch;
        pos.clear();
        // The key's windows are sorted by start, and every start is a multiple of the slide:
        // walk them from `first` alongside the record's windows, inserting the missing ones.
        let mut i = find(ws, first).unwrap_or_else(|i| i);
        let mut start = first;
        while start <= t {
            if i == ws.len() || ws[i].start != start {
                // Cached clean: it reaches the store only once a fold changes it.
                let loaded = loader.call1((key, start, start + size))?;
                let (slots, new) = if loaded.is_none() {
                    (create_slots(&self.aggs, n_slots), true)
                } else {
                    match slots_of(n_slots, &loaded) {
                        Some(s) => (s, false),
                        None => return Ok(false),
                    }
                };
                ws.insert(i, Entry { start, slots, dirty: false, new });
                self.cached += 1;
                self.min_end = self.min_end.min(start + size);
            }
            pos.push(i);
            i += 1;
            start += slide;
        }
        if !pos.iter().all(|&p| fold_ok(&self.aggs, &ws[p].slots, vals)) {
            return Ok(false);
        }
        for &p in pos.iter() {
            let e = &mut ws[p];
            fold(&self.aggs, &mut e.slots, vals);
            if !e.dirty {
                e.dirty = true;
                self.dirty.push((key.into(), e.start));
            }
        }
        Ok(true)
    }

    /// One record of `run`: `value` (None: not bytes), the message `key` (None: absent or not
    /// bytes), the Kafka timestamp (read only with Kafka event time).
    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        value: Option<&[u8]>,
        key: Option<&[u8]>,
        kafka_ts: i64,
        marks: &mut Marks,
        horizon: i64,
        loader: &Bound<PyAny>,
    ) -> PyResult<Step> {
        const FALL: Step = Step::Stop(FALLBACK, 0, 0);
        let nf = self.fields.len();
        let mut slots = [Val::Missing; MAX_FIELDS];
        let vals = &mut slots[..nf];
        let Some(b) = value else { return Ok(FALL) };
        if b.len() > self.max_bytes || scan(b, &self.fields, vals).is_none() {
            return Ok(FALL);
        }
        if let Some(f) = &self.filter {
            if !f.eval(vals) {
                self.handled += 1;
                self.nbytes += b.len() as u64;
                return Ok(Step::Next);
            }
        }
        let t = match self.time {
            Time::Kafka => {
                if kafka_ts < 0 {
                    return Ok(FALL);
                }
                kafka_ts
            }
            Time::Millis(f) => match vals[f] {
                Val::Int(t) if (0..MAX_EVENT_TIME_MS).contains(&t) => t,
                _ => return Ok(FALL),
            },
            Time::Seconds(f) => match vals[f] {
                Val::Int(s) if (0..MAX_EVENT_TIME_MS / 1000).contains(&s) => s * 1000,
                _ => return Ok(FALL),
            },
            Time::Forwarded => return Ok(FALL),
        };
        if t > horizon {
            return Ok(FALL);
        }
        // The key, borrowed from the value, the message key, or a decimal int.
        let key: &str = match self.key {
            Key::Message => match key.and_then(|k| std::str::from_utf8(k).ok()) {
                Some(k) => k,
                None => return Ok(FALL),
            },
            Key::Field(f) => match vals[f] {
                Val::Str(s) => s,
                Val::Int(v) => {
                    marks.keybuf.clear();
                    marks.keybuf.push_str(&v.to_string());
                    marks.keybuf.as_str()
                }
                _ => return Ok(FALL),
            },
        };
        match self.place(key, t, vals, marks.task, &mut marks.op, loader)? {
            Placed::Fall => return Ok(FALL),
            Placed::Late(before) => {
                self.handled += 1;
                self.nbytes += b.len() as u64;
                if t - self.ooo > marks.task {
                    marks.task = t - self.ooo;
                }
                return Ok(Step::Stop(LATE, t, before));
            }
            Placed::Folded => {}
        }
        self.handled += 1;
        self.nbytes += b.len() as u64;
        if t - self.ooo > marks.task {
            marks.task = t - self.ooo;
        }
        Ok(Step::Next)
    }

    /// The window operator's part of a record (`process` of `weir.window_record_paths`): the
    /// record of `key` at event time `t` with the field values `vals`, at the watermark
    /// `task_wm` (lifting the operator's `op_wm`, which never goes back). Nothing is applied
    /// unless `Folded`; `Late` carries the task watermark it was late at.
    #[allow(clippy::too_many_arguments)]
    fn place(
        &mut self,
        key: &str,
        t: i64,
        vals: &[Val],
        task_wm: i64,
        op_wm: &mut i64,
        loader: &Bound<PyAny>,
    ) -> PyResult<Placed> {
        // Numeric aggregate fields must hold numbers (else Python dead-letters the record).
        if self.aggs.iter().any(|(_, f)| f.is_some_and(|f| as_num(vals[f]).is_none())) {
            return Ok(Placed::Fall);
        }
        // The window operator: watermarks never go back; closed windows take nothing.
        let mut watermark = task_wm;
        if watermark > *op_wm {
            *op_wm = watermark;
        } else {
            watermark = *op_wm;
        }
        let sliding = self.slide != self.size;
        let wstart = t - t.rem_euclid(self.size); // tumbling: the window
        let end = wstart + self.size;
        let mut first = wstart; // sliding: the first open window holding t (as `build_sliding`)
        let late = if sliding {
            // Windows holding t start in (t - size, t]; the open ones (end > W - L + 1) start
            // after W - L + 1 - size. The first multiple of slide past both bounds.
            let lo = (t - self.size + 1).max(sub(sub(watermark, self.lateness_m1), self.size - 1));
            first = lo + (-lo).rem_euclid(self.slide);
            first > t
        } else {
            end <= sub(watermark, self.lateness_m1)
        };
        if late {
            return Ok(Placed::Late(task_wm));
        }
        let folded = if sliding {
            self.fold_sliding(key, t, first, vals, loader)?
        } else {
            self.fold_tumbling(key, wstart, vals, loader)?
        };
        Ok(if folded { Placed::Folded } else { Placed::Fall })
    }
}

impl Windows {
    /// One message of the repartition topic (stage 2, `run_forwarded`) at the upstream
    /// watermark `wm`: None when folded, else the code (and the late record's event time) the
    /// caller handles. Nothing of a record that is not folded is applied.
    fn forwarded(
        &mut self,
        value: Option<&[u8]>,
        key: Option<&[u8]>,
        wm: i64,
        op_wm: &mut i64,
        loader: &Bound<PyAny>,
    ) -> PyResult<Option<(u8, i64)>> {
        let Some(key) = key else { return Ok(Some((MARKER, 0))) };
        let (Some(b), Ok(key)) = (value, std::str::from_utf8(key)) else { return Ok(Some((FALLBACK, 0))) };
        let mut slots = [Val::Missing; MAX_FIELDS];
        let vals = &mut slots[..self.fields.len()];
        let t = match scan_forwarded(b, &self.fields, vals) {
            Some(t) if (0..MAX_EVENT_TIME_MS).contains(&t) => t,
            _ => return Ok(Some((FALLBACK, 0))),
        };
        let code = match self.place(key, t, vals, wm, op_wm, loader)? {
            Placed::Folded => None,
            Placed::Late(_) => Some((LATE, t)),
            Placed::Fall => return Ok(Some((FALLBACK, 0))),
        };
        self.handled += 1;
        self.nbytes += b.len() as u64;
        Ok(code)
    }
}

/// What `Windows::place` did with a record.
enum Placed {
    Folded,
    /// Late at this task watermark.
    Late(i64),
    /// Not applied: the Python path decides.
    Fall,
}

/// A record field's value as the aggregates see it. Only exact ints within 64 bits and finite
/// floats are numbers here; anything else (a str, a subclass, a container, an int beyond 64
/// bits, NaN or an infinity) is `Other` or what it is, so that a numeric aggregate reading it
/// leaves the record to the Python path.
fn val_of(v: Option<Bound<PyAny>>) -> Val<'static> {
    let Some(v) = v else { return Val::Missing };
    if v.is_none() {
        Val::Null
    } else if v.is_exact_instance_of::<PyInt>() {
        v.extract::<i64>().map_or(Val::Other, Val::Int)
    } else if v.is_exact_instance_of::<PyFloat>() {
        let f = v.downcast_exact::<PyFloat>().map_or(f64::NAN, |f| f.value());
        if f.is_finite() {
            Val::Float(f)
        } else {
            Val::Other
        }
    } else if v.is_exact_instance_of::<PyBool>() {
        Val::Bool(v.is_truthy().unwrap_or(false))
    } else {
        Val::Other
    }
}

fn sub(a: i64, b: i64) -> i64 {
    a.saturating_sub(b)
}

#[pymethods]
impl Windows {
    #[new]
    #[pyo3(signature = (size, slide, lateness, ooo, max_bytes, cache_limit, fields, time, key, filter, aggs))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python,
        size: i64,
        slide: i64,
        lateness: i64,
        ooo: i64,
        max_bytes: usize,
        cache_limit: usize,
        fields: Vec<String>,
        time: (String, i64),
        key: (String, i64),
        filter: Option<Bound<PyAny>>,
        aggs: Vec<(String, i64)>,
    ) -> PyResult<Self> {
        if fields.len() > MAX_FIELDS || aggs.len() > MAX_SLOTS / 2 {
            return Err(PyValueError::new_err("too many fields for the native path"));
        }
        if size <= 0 || slide <= 0 || slide > size {
            return Err(PyValueError::new_err("size and slide must be positive, slide at most size"));
        }
        let idx = |i: i64| -> PyResult<usize> {
            usize::try_from(i).ok().filter(|i| *i < fields.len()).ok_or_else(|| PyValueError::new_err("field index"))
        };
        let time = match time.0.as_str() {
            "kafka" => Time::Kafka,
            "millis" => Time::Millis(idx(time.1)?),
            "seconds" => Time::Seconds(idx(time.1)?),
            "forwarded" => Time::Forwarded,
            t => return Err(PyValueError::new_err(format!("unknown time {t:?}"))),
        };
        let key = match key.0.as_str() {
            "message" => Key::Message,
            "field" => Key::Field(idx(key.1)?),
            k => return Err(PyValueError::new_err(format!("unknown key {k:?}"))),
        };
        let mut parsed = Vec::new();
        let mut n_slots = 0;
        for (f, field) in aggs {
            let agg = match f.as_str() {
                "count" => Agg::Count,
                "sum" => Agg::Sum,
                "min" => Agg::Min,
                "max" => Agg::Max,
                "avg" => Agg::Avg,
                other => return Err(PyValueError::new_err(format!("no native aggregate {other:?}"))),
            };
            n_slots += if agg == Agg::Avg { 2 } else { 1 };
            let field = if agg == Agg::Count { None } else { Some(idx(field)?) };
            parsed.push((agg, field));
        }
        let filter = match filter {
            Some(c) if !c.is_none() => Some(cond_of(&c)?),
            _ => None,
        };
        Ok(Windows {
            size,
            slide,
            lateness_m1: lateness - 1,
            ooo,
            max_bytes,
            cache_limit,
            py_fields: fields.iter().map(|f| PyString::intern(py, f).unbind()).collect(),
            fields: fields.into_iter().map(Into::into).collect(),
            time,
            key,
            filter,
            aggs: parsed,
            n_slots,
            cache: FxHashMap::default(),
            cached: 0,
            min_end: i64::MAX,
            dirty: Vec::new(),
            scratch: Vec::new(),
            handled: 0,
            nbytes: 0,
        })
    }

    /// Fold `values[start:]` in order (see the module docs). Returns `(index, code, task_wm,
    /// op_wm, late_ts, late_wm)`: code 0 when every record is done, 1 when record `index` is
    /// late (`late_ts`, at watermark `late_wm`; `task_wm` already includes it), 2 when record
    /// `index` needs the Python path (nothing of it applied).
    #[pyo3(signature = (values, keys, kafka_ts, start, task_wm, op_wm, horizon, loader))]
    #[allow(clippy::too_many_arguments)]
    fn run<'py>(
        &mut self,
        values: &Bound<'py, PyList>,
        keys: Option<&Bound<'py, PyList>>,
        kafka_ts: Option<&Bound<'py, PyList>>,
        start: usize,
        task_wm: i64,
        op_wm: i64,
        horizon: i64,
        loader: &Bound<'py, PyAny>,
    ) -> PyResult<(usize, u8, i64, i64, i64, i64)> {
        let n = values.len();
        let mut marks = Marks { task: task_wm, op: op_wm, keybuf: String::new() };
        for i in start..n {
            let item = values.get_item(i)?;
            let value = item.downcast::<PyBytes>().ok().map(|b| b.as_bytes());
            let kitem = match (&self.key, keys) {
                (Key::Message, Some(keys)) => Some(keys.get_item(i)?),
                (Key::Message, None) => return Err(PyValueError::new_err("message keys")),
                _ => None,
            };
            let key = kitem.as_ref().and_then(|k| k.downcast::<PyBytes>().ok()).map(|k| k.as_bytes());
            let ts: i64 = match self.time {
                Time::Kafka => kafka_ts.expect("kafka timestamps").get_item(i)?.extract()?,
                _ => 0,
            };
            if let Step::Stop(code, t, late_wm) = self.step(value, key, ts, &mut marks, horizon, loader)? {
                return Ok((i, code, marks.task, marks.op, t, late_wm));
            }
        }
        Ok((n, DONE, marks.task, marks.op, 0, 0))
    }

    /// `run` over group `group` of the batch `fetch` holds (`weir_native.Fetch`): the same
    /// fold, reading each record where librdkafka put it.
    #[pyo3(signature = (fetch, group, start, task_wm, op_wm, horizon, loader))]
    #[allow(clippy::too_many_arguments)]
    fn run_fetched<'py>(
        &mut self,
        fetch: PyRef<'py, Fetch>,
        group: usize,
        start: usize,
        task_wm: i64,
        op_wm: i64,
        horizon: i64,
        loader: &Bound<'py, PyAny>,
    ) -> PyResult<(usize, u8, i64, i64, i64, i64)> {
        let msgs = &fetch.groups.get(group).ok_or_else(|| PyValueError::new_err("no such group"))?.msgs;
        let kafka_time = matches!(self.time, Time::Kafka);
        let mut marks = Marks { task: task_wm, op: op_wm, keybuf: String::new() };
        for (i, &m) in msgs.iter().enumerate().skip(start) {
            // SAFETY: the message stays alive while `fetch` holds its batch (borrowed here).
            let msg = unsafe { &*m };
            let ts = if kafka_time { fetch.timestamp(m).1 } else { 0 };
            if let Step::Stop(code, t, late_wm) = self.step(msg.value(), msg.key(), ts, &mut marks, horizon, loader)? {
                return Ok((i, code, marks.task, marks.op, t, late_wm));
            }
        }
        Ok((msgs.len(), DONE, marks.task, marks.op, 0, 0))
    }

    /// Stage 2 of a repartitioned job: fold the repartition topic's messages `values[start:]`
    /// (with their message `keys`) at the upstream watermark `wm`, as `weir.core`'s
    /// `_keyed_repartitioned` does. `op_wm` is the operator's one-slot highest watermark (a
    /// list). Returns `(index, code, late_ts)`: code 0 when every message is done, else message
    /// `index` is late (1, at `late_ts`), needs the Python path (2) or is a watermark marker (3).
    #[pyo3(signature = (values, keys, start, wm, op_wm, loader))]
    #[allow(clippy::too_many_arguments)]
    fn run_forwarded<'py>(
        &mut self,
        values: &Bound<'py, PyList>,
        keys: &Bound<'py, PyList>,
        start: usize,
        wm: i64,
        op_wm: &Bound<'py, PyList>,
        loader: &Bound<'py, PyAny>,
    ) -> PyResult<(usize, u8, i64)> {
        let mut op: i64 = op_wm.get_item(0)?.extract()?;
        let before = op;
        let n = values.len();
        let mut out = (n, DONE, 0);
        for i in start..n {
            let item = values.get_item(i)?;
            let value = item.downcast::<PyBytes>().ok().map(|b| b.as_bytes());
            let kitem = keys.get_item(i)?;
            // A key that is not bytes reads as invalid UTF-8: the Python path decides.
            let key = match kitem.downcast::<PyBytes>() {
                Ok(k) => Some(k.as_bytes()),
                Err(_) if kitem.is_none() => None,
                Err(_) => Some(&b"\xff"[..]),
            };
            if let Some((code, t)) = self.forwarded(value, key, wm, &mut op, loader)? {
                out = (i, code, t);
                break;
            }
        }
        if op != before {
            op_wm.set_item(0, op)?;
        }
        Ok(out)
    }

    /// `run_forwarded` over group `group` of the batch `fetch` holds (`weir_native.Fetch`).
    #[pyo3(signature = (fetch, group, start, wm, op_wm, loader))]
    #[allow(clippy::too_many_arguments)]
    fn run_forwarded_fetched<'py>(
        &mut self,
        fetch: PyRef<'py, Fetch>,
        group: usize,
        start: usize,
        wm: i64,
        op_wm: &Bound<'py, PyList>,
        loader: &Bound<'py, PyAny>,
    ) -> PyResult<(usize, u8, i64)> {
        let msgs = &fetch.groups.get(group).ok_or_else(|| PyValueError::new_err("no such group"))?.msgs;
        let mut op: i64 = op_wm.get_item(0)?.extract()?;
        let before = op;
        let mut out = (msgs.len(), DONE, 0);
        for (i, &m) in msgs.iter().enumerate().skip(start) {
            // SAFETY: the message stays alive while `fetch` holds its batch (borrowed here).
            let msg = unsafe { &*m };
            if let Some((code, t)) = self.forwarded(msg.value(), msg.key(), wm, &mut op, loader)? {
                out = (i, code, t);
                break;
            }
        }
        if op != before {
            op_wm.set_item(0, op)?;
        }
        Ok(out)
    }

    /// One record a pipeline's Python functions prepared (`weir.core`'s `accept` of the keyed
    /// stage): the window operator's `process(key, ts, record, watermark)` with the aggregates
    /// folded here. `op_wm` is the operator's one-slot highest watermark (a list), lifted here
    /// as `process` lifts it. Returns 0 (folded), 1 (late: nothing applied) or 2 (nothing
    /// applied: the caller `evict`s the key's windows at `ts` and runs `process` itself).
    #[pyo3(signature = (key, ts, record, watermark, op_wm, loader))]
    #[allow(clippy::too_many_arguments)]
    fn accept<'py>(
        &mut self,
        py: Python<'py>,
        key: &Bound<'py, PyAny>,
        ts: i64,
        record: &Bound<'py, PyAny>,
        watermark: i64,
        op_wm: &Bound<'py, PyList>,
        loader: &Bound<'py, PyAny>,
    ) -> PyResult<u8> {
        let (Ok(d), Ok(key)) = (record.downcast_exact::<PyDict>(), key.downcast_exact::<PyString>()) else {
            return Ok(FALLBACK);
        };
        let Ok(key) = key.to_str() else { return Ok(FALLBACK) };
        if !(0..MAX_EVENT_TIME_MS).contains(&ts) {
            return Ok(FALLBACK);
        }
        let mut slots = [Val::Missing; MAX_FIELDS];
        let vals = &mut slots[..self.py_fields.len()];
        for (v, name) in vals.iter_mut().zip(&self.py_fields) {
            *v = val_of(d.get_item(name.bind(py))?);
        }
        let before: i64 = op_wm.get_item(0)?.extract()?;
        let mut op = before;
        let placed = self.place(key, ts, vals, watermark, &mut op, loader)?;
        if op != before {
            op_wm.set_item(0, op)?;
        }
        Ok(match placed {
            Placed::Folded => DONE,
            Placed::Late(_) => LATE,
            Placed::Fall => FALLBACK,
        })
    }

    /// Write every window changed since the last flush back through `adopt((key, start, end),
    /// accumulator, new)`; then forget the windows closed at `threshold` (they fire next) and,
    /// past the cache limit, everything (the store has it all).
    fn flush(&mut self, py: Python, adopt: &Bound<PyAny>, threshold: i64) -> PyResult<()> {
        let dirty = std::mem::take(&mut self.dirty);
        for (key, start) in dirty {
            let Some(e) = self.cache.get_mut(&key).and_then(|ws| find(ws, start).ok().map(|i| &mut ws[i])) else {
                continue;
            };
            if !e.dirty {
                continue;
            }
            let acc = slots_to_py(py, &e.slots)?;
            let new = e.new;
            e.dirty = false;
            e.new = false;
            adopt.call1(((&*key, start, start + self.size), acc, new))?;
        }
        if self.cached > self.cache_limit {
            self.cache.clear();
            self.cached = 0;
            self.min_end = i64::MAX;
        } else if threshold >= self.min_end {
            let size = self.size;
            let mut min_end = i64::MAX;
            let mut cached = 0;
            self.cache.retain(|_, ws| {
                ws.retain(|e| e.start + size > threshold);
                for e in ws.iter() {
                    min_end = min_end.min(e.start + size);
                }
                cached += ws.len();
                !ws.is_empty()
            });
            self.min_end = min_end;
            self.cached = cached;
        }
        Ok(())
    }

    /// Hand every window of `key` holding `ts` to the Python path: written back through
    /// `adopt` if changed, and forgotten here (the next record of them reads the store again).
    fn evict(&mut self, py: Python, key: &str, ts: i64, adopt: &Bound<PyAny>) -> PyResult<()> {
        let Some(ws) = self.cache.get_mut(key) else { return Ok(()) };
        // The windows holding ts start in (ts - size, ts]: a run of the sorted starts.
        let lo = find(ws, ts - self.size + 1).unwrap_or_else(|i| i);
        let hi = find(ws, ts).map_or_else(|i| i, |i| i + 1);
        let gone: Vec<Entry> = ws.drain(lo..hi).collect();
        if ws.is_empty() {
            self.cache.remove(key);
        }
        self.cached -= gone.len();
        for e in gone {
            if e.dirty {
                let acc = slots_to_py(py, &e.slots)?;
                adopt.call1(((key, e.start, e.start + self.size), acc, e.new))?;
            }
        }
        Ok(())
    }

    /// Forget every cached window (after a flush: they are all in the store).
    fn clear(&mut self) {
        self.cache.clear();
        self.dirty.clear();
        self.cached = 0;
        self.min_end = i64::MAX;
    }

    /// `(records, bytes)` finished by `run` since the last call.
    fn take_counts(&mut self) -> (u64, u64) {
        let out = (self.handled, self.nbytes);
        self.handled = 0;
        self.nbytes = 0;
        out
    }

    #[getter]
    fn cached(&self) -> usize {
        self.cached
    }
}

/// Where the window starting at `start` is in a key's cached windows (sorted by start), or
/// where it goes.
fn find(ws: &[Entry], start: i64) -> Result<usize, usize> {
    ws.binary_search_by_key(&start, |e| e.start)
}

/// A fresh accumulator (`Aggregator.create`).
fn create_slots(aggs: &[(Agg, Option<usize>)], n_slots: usize) -> Slots {
    let mut s = Vec::with_capacity(n_slots);
    for (agg, _) in aggs {
        match agg {
            Agg::Count | Agg::Sum => s.push(Some(Num::Int(0))),
            Agg::Min | Agg::Max => s.push(None),
            Agg::Avg => {
                s.push(Some(Num::Int(0)));
                s.push(Some(Num::Int(0)));
            }
        }
    }
    s
}

/// A stored accumulator as slots, or None when it is not one this side folds.
fn slots_of(n_slots: usize, acc: &Bound<PyAny>) -> Option<Slots> {
    let list = acc.downcast::<PyList>().ok()?;
    if list.len() != n_slots {
        return None;
    }
    list.iter().map(|v| if v.is_none() { Some(None) } else { num_of(&v).ok().map(Some) }).collect()
}

/// Whether `fold` would succeed (nothing changed either way).
fn fold_ok(aggs: &[(Agg, Option<usize>)], slots: &Slots, vals: &[Val]) -> bool {
    let mut out = [None; MAX_SLOTS];
    let n = slots.len();
    out[..n].copy_from_slice(slots);
    fold_into(aggs, &mut out[..n], vals).is_some()
}

/// Slots of one accumulator at most (16 aggregates, avg takes two).
const MAX_SLOTS: usize = 32;

/// `Aggregator.add` of weir.aggregates for these specs, in place: false (and `slots` unchanged)
/// where Python would raise Overflow or a slot holds something unexpected (Python decides).
fn fold(aggs: &[(Agg, Option<usize>)], slots: &mut Slots, vals: &[Val]) -> bool {
    let mut out = [None; MAX_SLOTS];
    let n = slots.len();
    out[..n].copy_from_slice(slots);
    if fold_into(aggs, &mut out[..n], vals).is_none() {
        return false;
    }
    slots.copy_from_slice(&out[..n]);
    true
}

fn fold_into(aggs: &[(Agg, Option<usize>)], out: &mut [Option<Num>], vals: &[Val]) -> Option<()> {
    let mut i = 0;
    for (agg, field) in aggs {
        let v = field.map(|f| as_num(vals[f]));
        match agg {
            Agg::Count => out[i] = Some(add(out[i]?, Num::Int(1))?),
            Agg::Sum => out[i] = Some(add(out[i]?, v??)?),
            Agg::Min | Agg::Max => {
                let v = v??;
                let want = if *agg == Agg::Min { Ordering::Less } else { Ordering::Greater };
                // Strict: of equal values the earliest stays (with its type: 1 vs 1.0).
                if out[i].is_none() || cmp(v, out[i]?)? == want {
                    out[i] = Some(v);
                }
            }
            Agg::Avg => {
                out[i] = Some(add(out[i]?, v??)?);
                out[i + 1] = Some(add(out[i + 1]?, Num::Int(1))?);
                i += 1;
            }
        }
        i += 1;
    }
    Some(())
}

#[pymodule]
fn weir_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Windows>()?;
    m.add_class::<Fetch>()?;
    Ok(())
}
