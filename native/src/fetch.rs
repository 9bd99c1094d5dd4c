//! Consuming straight from librdkafka: a batch of messages read without a Python object each.
//!
//! confluent-kafka's `Consumer.consume` builds a `Message` object (and a `bytes` for the value,
//! another for the key) per record; that costs more than the whole native fold afterwards.
//! `Fetch` reads the same consumer's records itself, through the librdkafka that
//! confluent-kafka loaded (the very instance: found in `/proc/self/maps` and opened with
//! `RTLD_NOLOAD`, never a second copy), so its consumer keeps everything it does: the
//! configuration, security, assignment, positions, offsets in transactions, lag, statistics,
//! error callbacks.
//!
//! How: the partitions of the worker are forwarded to a queue of `Fetch`'s own
//! (`rd_kafka_queue_get_partition` + `rd_kafka_queue_forward`, after every assign), and
//! `consume` takes a batch from it with `rd_kafka_consume_batch_queue` while the GIL is
//! released. The consumer's own queue then carries only events (errors, logs, statistics), which
//! the Python side serves with `Consumer.consume(n, 0)` as before; a record that reached that
//! queue before the forwarding comes back there and the Python side runs it first.
//!
//! The batch stays in librdkafka's memory, grouped by partition in consumed order, until the
//! next `consume` or `release`: `Windows.run_fetched` folds a group in place; `records` hands a
//! range out as tuples for the Python path (dead letters, fallbacks, replays).
//!
//! The Python side must `close` a `Fetch` before it closes the consumer.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};
use std::ffi::{c_char, c_int, c_void, CStr, CString};

/// librdkafka's `rd_kafka_message_t` (public and stable since 0.8).
#[repr(C)]
pub struct RdMsg {
    err: c_int,
    rkt: *mut c_void,
    partition: i32,
    payload: *const u8,
    len: usize,
    key: *const u8,
    key_len: usize,
    offset: i64,
    _private: *mut c_void,
}

impl RdMsg {
    pub fn value(&self) -> Option<&[u8]> {
        if self.payload.is_null() {
            return None;
        }
        Some(unsafe { std::slice::from_raw_parts(self.payload, self.len) })
    }

    pub fn key(&self) -> Option<&[u8]> {
        if self.key.is_null() {
            return None;
        }
        Some(unsafe { std::slice::from_raw_parts(self.key, self.key_len) })
    }
}

type Handle = *mut c_void;

/// The librdkafka functions `Fetch` calls, from the instance confluent-kafka loaded.
struct Api {
    kind: unsafe extern "C" fn(Handle) -> c_int,
    name: unsafe extern "C" fn(Handle) -> *const c_char,
    queue_new: unsafe extern "C" fn(Handle) -> Handle,
    queue_get_partition: unsafe extern "C" fn(Handle, *const c_char, i32) -> Handle,
    queue_forward: unsafe extern "C" fn(Handle, Handle),
    queue_destroy: unsafe extern "C" fn(Handle),
    consume_batch_queue: unsafe extern "C" fn(Handle, c_int, *mut *mut RdMsg, usize) -> isize,
    message_destroy: unsafe extern "C" fn(*mut RdMsg),
    message_timestamp: unsafe extern "C" fn(*const RdMsg, *mut c_int) -> i64,
    topic_name: unsafe extern "C" fn(Handle) -> *const c_char,
    err2str: unsafe extern "C" fn(c_int) -> *const c_char,
}

/// The path of the one librdkafka this process has loaded.
fn loaded_librdkafka() -> Result<String, String> {
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| format!("/proc/self/maps: {e}"))?;
    let mut paths: Vec<&str> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.rsplit('/').next().is_some_and(|n| n.starts_with("librdkafka")))
        .collect();
    paths.sort_unstable();
    paths.dedup();
    match paths.as_slice() {
        [one] => Ok((*one).to_string()),
        [] => Err("no librdkafka is loaded".into()),
        more => Err(format!("more than one librdkafka is loaded: {}", more.join(", "))),
    }
}

impl Api {
    fn load() -> Result<Api, String> {
        let path = loaded_librdkafka()?;
        let cpath = CString::new(path.clone()).map_err(|e| e.to_string())?;
        // RTLD_NOLOAD: a handle to the copy already loaded, or nothing (never a second copy).
        let lib = unsafe { libc::dlopen(cpath.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
        if lib.is_null() {
            return Err(format!("{path} cannot be opened"));
        }
        let sym = |name: &str| -> Result<*mut c_void, String> {
            let c = CString::new(name).map_err(|e| e.to_string())?;
            let p = unsafe { libc::dlsym(lib, c.as_ptr()) };
            if p.is_null() {
                Err(format!("{path} has no {name}"))
            } else {
                Ok(p)
            }
        };
        // SAFETY: each symbol has the signature librdkafka's rdkafka.h declares for it.
        unsafe {
            Ok(Api {
                kind: std::mem::transmute::<*mut c_void, _>(sym("rd_kafka_type")?),
                name: std::mem::transmute::<*mut c_void, _>(sym("rd_kafka_name")?),
                queue_new: std::mem::transmute::<*mut c_void, _>(sym("rd_kafka_queue_new")?),
                queue_get_partition: std::mem::transmute::<*mut c_void, _>(sym("rd_kafka_queue_get_partition")?),
                queue_forward: std::mem::transmute::<*mut c_void, _>(sym("rd_kafka_queue_forward")?),
                queue_destroy: std::mem::transmute::<*mut c_void, _>(sym("rd_kafka_queue_destroy")?),
                consume_batch_queue: std::mem::transmute::<*mut c_void, _>(sym("rd_kafka_consume_batch_queue")?),
                message_destroy: std::mem::transmute::<*mut c_void, _>(sym("rd_kafka_message_destroy")?),
                message_timestamp: std::mem::transmute::<*mut c_void, _>(sym("rd_kafka_message_timestamp")?),
                topic_name: std::mem::transmute::<*mut c_void, _>(sym("rd_kafka_topic_name")?),
                err2str: std::mem::transmute::<*mut c_void, _>(sym("rd_kafka_err2str")?),
            })
        }
    }
}

/// One partition's records of the current batch, in consumed order.
pub struct Group {
    topic: String,
    partition: i32,
    pub msgs: Vec<*const RdMsg>,
}

/// A consumer's records read natively; see the module docs.
#[pyclass(module = "weir_native")]
pub struct Fetch {
    api: Api,
    /// The confluent-kafka `Consumer` (kept alive; its handle is read from it on every call).
    consumer: Py<PyAny>,
    rk: Handle,
    queue: Handle,
    routed: Vec<(CString, i32)>,
    batch: Vec<*mut RdMsg>,
    pub groups: Vec<Group>,
}

// SAFETY: librdkafka's handles are thread-safe; the batch is only touched through `&mut self`.
unsafe impl Send for Fetch {}
unsafe impl Sync for Fetch {}

/// RD_KAFKA_CONSUMER
const CONSUMER: c_int = 1;

fn err(msg: impl Into<String>) -> PyErr {
    PyRuntimeError::new_err(msg.into())
}

impl Fetch {
    /// The consumer's `rd_kafka_t *` as confluent-kafka holds it now (null once closed):
    /// the first field after the object header of its `Handle` struct.
    fn handle_of(consumer: &Py<PyAny>) -> Handle {
        unsafe {
            let base = consumer.as_ptr() as *const u8;
            *(base.add(std::mem::size_of::<pyo3::ffi::PyObject>()) as *const Handle)
        }
    }

    fn live(&self) -> PyResult<Handle> {
        if self.queue.is_null() {
            return Err(err("the native consumer is closed"));
        }
        if Fetch::handle_of(&self.consumer) != self.rk {
            return Err(err("the consumer was closed before its native reader"));
        }
        Ok(self.rk)
    }

    pub fn timestamp(&self, m: *const RdMsg) -> (i32, i64) {
        let mut kind: c_int = 0;
        let ts = unsafe { (self.api.message_timestamp)(m, &mut kind) };
        (kind, ts)
    }

    fn drain_queue(&mut self) {
        let mut buf: Vec<*mut RdMsg> = Vec::with_capacity(1024);
        loop {
            let n = unsafe { (self.api.consume_batch_queue)(self.queue, 0, buf.as_mut_ptr(), buf.capacity()) };
            if n <= 0 {
                break;
            }
            unsafe { buf.set_len(n as usize) };
            for m in buf.drain(..) {
                unsafe { (self.api.message_destroy)(m) };
            }
        }
    }
}

#[pymethods]
impl Fetch {
    /// A native reader of `consumer` (a confluent-kafka `Consumer`); raises when this process's
    /// librdkafka cannot be used this way (the caller then consumes through confluent-kafka).
    #[new]
    fn new(consumer: Bound<PyAny>) -> PyResult<Self> {
        // confluent-kafka's C types (and subclasses of them) live in its `cimpl` module.
        let cimpl = consumer.py().import("confluent_kafka.cimpl")?;
        let base = cimpl.getattr("Consumer")?;
        let producer = cimpl.getattr("Producer")?;
        if !consumer.is_instance(&base)? && !consumer.is_instance(&producer)? {
            let name = consumer.get_type().name()?;
            return Err(err(format!("not a confluent-kafka consumer ({name})")));
        }
        let api = Api::load().map_err(err)?;
        let consumer = consumer.unbind();
        let rk = Fetch::handle_of(&consumer);
        if rk.is_null() {
            return Err(err("the consumer is closed"));
        }
        // The handle is a consumer of this librdkafka: its type and its name ("<id>#consumer-<n>").
        let kind = unsafe { (api.kind)(rk) };
        let name = unsafe { CStr::from_ptr((api.name)(rk)) }.to_string_lossy().into_owned();
        if kind != CONSUMER || !name.contains("#consumer-") {
            return Err(err(format!("unexpected librdkafka handle (type {kind}, name {name:?})")));
        }
        let queue = unsafe { (api.queue_new)(rk) };
        if queue.is_null() {
            return Err(err("rd_kafka_queue_new failed"));
        }
        Ok(Fetch { api, consumer, rk, queue, routed: Vec::new(), batch: Vec::new(), groups: Vec::new() })
    }

    /// Forward these partitions' records to this reader (after every `assign`: librdkafka
    /// points a partition at the consumer's queue again when its fetching starts).
    fn route(&mut self, partitions: Vec<(String, i32)>) -> PyResult<()> {
        let rk = self.live()?;
        for (topic, partition) in partitions {
            let ctopic = CString::new(topic.clone()).map_err(|e| err(e.to_string()))?;
            let pq = unsafe { (self.api.queue_get_partition)(rk, ctopic.as_ptr(), partition) };
            if pq.is_null() {
                return Err(err(format!("{topic}-{partition}: rd_kafka_queue_get_partition failed")));
            }
            unsafe {
                (self.api.queue_forward)(pq, self.queue);
                (self.api.queue_destroy)(pq);
            }
            if !self.routed.iter().any(|(t, p)| *t == ctopic && *p == partition) {
                self.routed.push((ctopic, partition));
            }
        }
        Ok(())
    }

    /// Release the last batch and read up to `max` records, waiting at most `timeout_ms` for
    /// the first (without the GIL). Returns the batch's partitions as `(topic, partition,
    /// count, last offset)`, in the order each first appears, and the errors librdkafka
    /// reported in it as `(code, text)`.
    #[allow(clippy::type_complexity)]
    fn consume(
        &mut self,
        py: Python,
        max: usize,
        timeout_ms: i32,
    ) -> PyResult<(Vec<(String, i32, usize, i64)>, Vec<(i32, String)>)> {
        self.release();
        self.live()?;
        self.batch.reserve(max);
        let (queue, buf) = (self.queue as usize, self.batch.as_mut_ptr() as usize);
        let consume = self.api.consume_batch_queue;
        // `rd_kafka_consume_batch_queue` waits until it has `max` records or the timeout has
        // passed, so a batch that ends a burst would sit in the queue for the whole timeout.
        // Take what is there; only when nothing is, wait for the first record, then take what
        // came with it.
        let n = py.allow_threads(move || unsafe {
            let (queue, buf) = (queue as Handle, buf as *mut *mut RdMsg);
            let n = consume(queue, 0, buf, max);
            if n != 0 || timeout_ms == 0 || max == 0 {
                return n;
            }
            let first = consume(queue, timeout_ms, buf, 1);
            if first <= 0 || max == 1 {
                return first;
            }
            first + consume(queue, 0, buf.add(1), max - 1).max(0)
        });
        if n <= 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        unsafe { self.batch.set_len(n as usize) };
        let mut errors = Vec::new();
        let mut last: Option<(*mut c_void, i32, usize)> = None;
        for &m in &self.batch {
            let msg = unsafe { &*m };
            if msg.err != 0 {
                let text = match msg.value() {
                    Some(b) if !b.is_empty() => String::from_utf8_lossy(b).into_owned(),
                    _ => unsafe { CStr::from_ptr((self.api.err2str)(msg.err)) }.to_string_lossy().into_owned(),
                };
                errors.push((msg.err, text));
                continue;
            }
            let g = match last {
                Some((rkt, p, g)) if rkt == msg.rkt && p == msg.partition => g,
                _ => {
                    let topic = unsafe { CStr::from_ptr((self.api.topic_name)(msg.rkt)) }.to_string_lossy();
                    let g = match self.groups.iter().position(|g| g.partition == msg.partition && g.topic == topic) {
                        Some(g) => g,
                        None => {
                            self.groups.push(Group {
                                topic: topic.into_owned(),
                                partition: msg.partition,
                                msgs: Vec::new(),
                            });
                            self.groups.len() - 1
                        }
                    };
                    last = Some((msg.rkt, msg.partition, g));
                    g
                }
            };
            self.groups[g].msgs.push(m);
        }
        let groups = self
            .groups
            .iter()
            .map(|g| (g.topic.clone(), g.partition, g.msgs.len(), unsafe { (*g.msgs[g.msgs.len() - 1]).offset }))
            .collect();
        Ok((groups, errors))
    }

    /// Records `lo..hi` of group `group` as `(topic, partition, offset, key, value,
    /// timestamp type, timestamp)`.
    fn records<'py>(&self, py: Python<'py>, group: usize, lo: usize, hi: usize) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        let g = self.groups.get(group).ok_or_else(|| err("no such group"))?;
        let hi = hi.min(g.msgs.len());
        let mut out = Vec::with_capacity(hi.saturating_sub(lo));
        for &m in g.msgs.get(lo..hi).unwrap_or(&[]) {
            let msg = unsafe { &*m };
            let (kind, ts) = self.timestamp(m);
            let key = msg.key().map(|k| PyBytes::new(py, k));
            let value = msg.value().map(|v| PyBytes::new(py, v));
            out.push(PyTuple::new(
                py,
                [
                    g.topic.as_str().into_pyobject(py)?.into_any(),
                    g.partition.into_pyobject(py)?.into_any(),
                    msg.offset.into_pyobject(py)?.into_any(),
                    key.map_or_else(|| py.None().into_bound(py), |k| k.into_any()),
                    value.map_or_else(|| py.None().into_bound(py), |v| v.into_any()),
                    kind.into_pyobject(py)?.into_any(),
                    ts.into_pyobject(py)?.into_any(),
                ],
            )?);
        }
        Ok(out)
    }

    /// Give the current batch's records back to librdkafka.
    fn release(&mut self) {
        self.groups.clear();
        if !self.queue.is_null() && Fetch::handle_of(&self.consumer) == self.rk {
            for m in self.batch.drain(..) {
                unsafe { (self.api.message_destroy)(m) };
            }
        } else {
            self.batch.clear(); // the consumer is gone, and its memory with it
        }
    }

    /// Stop reading: the partitions go back to the consumer's queue and every record still
    /// held here is given back. Call before closing the consumer.
    fn close(&mut self) {
        if self.queue.is_null() {
            return;
        }
        self.release();
        if Fetch::handle_of(&self.consumer) == self.rk {
            for (topic, partition) in std::mem::take(&mut self.routed) {
                let pq = unsafe { (self.api.queue_get_partition)(self.rk, topic.as_ptr(), partition) };
                if !pq.is_null() {
                    unsafe {
                        (self.api.queue_forward)(pq, std::ptr::null_mut());
                        (self.api.queue_destroy)(pq);
                    }
                }
            }
            self.drain_queue();
            unsafe { (self.api.queue_destroy)(self.queue) };
        }
        self.queue = std::ptr::null_mut();
    }
}

impl Drop for Fetch {
    fn drop(&mut self) {
        self.close();
    }
}
