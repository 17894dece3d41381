//! Prometheus metrics on the server's metrics port, through Triton's custom metrics API.
//! The server hands out one object per family name and per label set, so a model loading
//! while its previous copy unloads (same names, same labels) must share them: families and
//! labelled metrics live in process-wide tables, reference-counted, and each is deleted
//! when its last user goes (metrics before their families).

use std::collections::HashMap;
use std::ffi::CString;
use std::ptr;
use std::sync::{Arc, Mutex, Weak};

use super::error::{TritonError, TritonResult, ffi};
use super::sys;
use crate::serving::{EngineMetrics, StepTimes};

/// Seconds; from a fast CPU step to a slow queue, finer around 0.2 s (a common TTFT target,
/// so that the share of first tokens later than it can be read off the buckets).
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

struct Family(*mut sys::TRITONSERVER_MetricFamily);

// SAFETY: the server's metric families are thread-safe objects (its metrics API may be called
// from any thread); the pointer is deleted once, by its one owner's drop.
unsafe impl Send for Family {}
// SAFETY: as for Send: shared use only makes the server's thread-safe calls.
unsafe impl Sync for Family {}

impl Family {
    fn new(
        kind: sys::TRITONSERVER_MetricKind,
        name: &str,
        description: &str,
    ) -> TritonResult<Self> {
        let (name, description) = (c_string(name)?, c_string(description)?);
        let mut raw = ptr::null_mut();
        ffi!(sys::TRITONSERVER_MetricFamilyNew(
            &mut raw,
            kind,
            name.as_ptr(),
            description.as_ptr()
        ))?;
        Ok(Family(raw))
    }
}

impl Drop for Family {
    fn drop(&mut self) {
        if let Err(e) = ffi!(sys::TRITONSERVER_MetricFamilyDelete(self.0)) {
            tracing::warn!("deleting a metric family failed: {e}");
        }
    }
}

fn c_string(text: &str) -> TritonResult<CString> {
    CString::new(text).map_err(|_| TritonError::internal(format!("NUL inside {text:?}")))
}

/// The metric families of one model.
pub struct MetricFamilies {
    prompt_tokens: Family,
    generated_tokens: Family,
    running: Family,
    waiting: Family,
    cancelled: Family,
    preempted: Family,
    time_to_first_token: Family,
    inter_token_latency: Family,
    kv_blocks_used: Family,
    kv_blocks_free: Family,
    prefix_hit_tokens: Family,
    steps: Family,
    step_sequences: Family,
    step_seconds: Family,
    healthy: Family,
    weight_bytes: Family,
    kv_bytes_per_token: Family,
}

static FAMILIES: Mutex<Weak<MetricFamilies>> = Mutex::new(Weak::new());

/// (metric, extra label value, model, instance).
type MetricKey = (&'static str, &'static str, String, String);
static METRICS: Mutex<Option<HashMap<MetricKey, Weak<Metric>>>> = Mutex::new(None);

impl MetricFamilies {
    /// The process's families, created by the first model that asks.
    pub fn shared() -> TritonResult<Arc<Self>> {
        let mut families = FAMILIES.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = families.upgrade() {
            return Ok(existing);
        }
        let created = Self::new()?;
        *families = Arc::downgrade(&created);
        Ok(created)
    }

    fn new() -> TritonResult<Arc<Self>> {
        use sys::{
            TRITONSERVER_METRIC_KIND_COUNTER as COUNTER, TRITONSERVER_METRIC_KIND_GAUGE as GAUGE,
            TRITONSERVER_METRIC_KIND_HISTOGRAM as HISTOGRAM,
        };
        Ok(Arc::new(MetricFamilies {
            prompt_tokens: Family::new(
                COUNTER,
                "llm_prompt_tokens_total",
                "Prompt tokens admitted",
            )?,
            generated_tokens: Family::new(
                COUNTER,
                "llm_generated_tokens_total",
                "Tokens generated",
            )?,
            running: Family::new(GAUGE, "llm_requests_running", "Sequences running in the engine")?,
            waiting: Family::new(GAUGE, "llm_requests_waiting", "Requests queued for the engine")?,
            cancelled: Family::new(
                COUNTER,
                "llm_requests_cancelled_total",
                "Requests stopped because the client cancelled or went away",
            )?,
            preempted: Family::new(
                COUNTER,
                "llm_requests_preempted_total",
                "Running sequences that gave their KV blocks back to make room (recomputed later)",
            )?,
            time_to_first_token: Family::new(
                HISTOGRAM,
                "llm_time_to_first_token_seconds",
                "From a request's arrival to its first generated token",
            )?,
            inter_token_latency: Family::new(
                HISTOGRAM,
                "llm_inter_token_latency_seconds",
                "Between consecutive generated tokens of one sequence",
            )?,
            kv_blocks_used: Family::new(GAUGE, "llm_kv_blocks_used", "KV-cache blocks in use")?,
            kv_blocks_free: Family::new(
                GAUGE,
                "llm_kv_blocks_free",
                "KV-cache blocks free or holding reusable prefixes",
            )?,
            prefix_hit_tokens: Family::new(
                COUNTER,
                "llm_prefix_cache_hit_tokens_total",
                "Prompt tokens whose K/V came from the prefix cache",
            )?,
            steps: Family::new(COUNTER, "llm_engine_steps_total", "Forward passes the engine ran")?,
            step_sequences: Family::new(
                COUNTER,
                "llm_engine_step_sequences_total",
                "Sequences run by those passes (over the steps: the mean batch)",
            )?,
            step_seconds: Family::new(
                COUNTER,
                "llm_engine_step_seconds_total",
                "Host time of the engine's steps by phase: schedule, forward (the pass and \
                 the choice of next tokens), detokenize, emit (responses, metrics, retiring)",
            )?,
            healthy: Family::new(
                GAUGE,
                "llm_engine_healthy",
                "1 while the instance's engine serves; 0 once it has stopped for good (its \
                 thread panicked or the GPU was lost: requests get UNAVAILABLE until the model \
                 is reloaded)",
            )?,
            weight_bytes: Family::new(
                GAUGE,
                "llm_weight_bytes",
                "Bytes of the model's weights on the instance's device, in their format (the \
                 load log names it)",
            )?,
            kv_bytes_per_token: Family::new(
                GAUGE,
                "llm_kv_bytes_per_token",
                "Bytes one token's K and V take in the instance's cache, all layers, in the \
                 cache's format (quant_policy or kv_cache_dtype)",
            )?,
        }))
    }
}

struct Metric {
    raw: *mut sys::TRITONSERVER_Metric,
    /// Deleted after this metric.
    _families: Arc<MetricFamilies>,
}

// SAFETY: the server's metrics are thread-safe (increment, set and observe may be called
// from any thread); the pointer is deleted once, by its one owner's drop.
unsafe impl Send for Metric {}
// SAFETY: as for Send: shared use only makes the server's thread-safe calls.
unsafe impl Sync for Metric {}

impl Metric {
    /// The metric of `family` for (model, instance) and the optional extra label, shared
    /// with whoever else holds it.
    fn shared(
        families: &Arc<MetricFamilies>,
        family: fn(&MetricFamilies) -> &Family,
        name: &'static str,
        (model, instance): (&str, &str),
        extra_label: Option<(&str, &'static str)>,
        histogram: bool,
    ) -> TritonResult<Arc<Self>> {
        let mut table = METRICS.lock().unwrap_or_else(|p| p.into_inner());
        let table = table.get_or_insert_with(HashMap::new);
        table.retain(|_, metric| metric.strong_count() > 0);
        let key = (name, extra_label.map_or("", |(_, value)| value), model.into(), instance.into());
        if let Some(existing) = table.get(&key).and_then(Weak::upgrade) {
            return Ok(existing);
        }
        let mut labels = vec![("model", model), ("instance", instance)];
        labels.extend(extra_label);
        let raw = Self::create(family(families), &labels, histogram)?;
        let metric = Arc::new(Metric { raw, _families: Arc::clone(families) });
        table.insert(key, Arc::downgrade(&metric));
        Ok(metric)
    }

    fn create(
        family: &Family,
        labels: &[(&str, &str)],
        histogram: bool,
    ) -> TritonResult<*mut sys::TRITONSERVER_Metric> {
        let strings: Vec<(CString, CString)> = labels
            .iter()
            .map(|(k, v)| Ok((c_string(k)?, c_string(v)?)))
            .collect::<TritonResult<_>>()?;
        let parameters: Vec<*mut sys::TRITONSERVER_Parameter> = strings
            .iter()
            .map(|(k, v)| {
                // SAFETY: both strings are NUL-terminated and outlive the call (copied).
                unsafe {
                    sys::TRITONSERVER_ParameterNew(
                        k.as_ptr(),
                        sys::TRITONSERVER_PARAMETER_STRING,
                        v.as_ptr().cast(),
                    )
                }
            })
            .collect();
        let mut raw = ptr::null_mut();
        let label_ptrs: Vec<*const sys::TRITONSERVER_Parameter> =
            parameters.iter().map(|p| p.cast_const()).collect();
        let created = if histogram {
            let mut args = ptr::null_mut();
            ffi!(sys::TRITONSERVER_MetricArgsNew(&mut args)).and_then(|()| {
                let result = ffi!(sys::TRITONSERVER_MetricArgsSetHistogram(
                    args,
                    LATENCY_BUCKETS.as_ptr(),
                    LATENCY_BUCKETS.len() as u64
                ))
                .and_then(|()| {
                    ffi!(sys::TRITONSERVER_MetricNewWithArgs(
                        &mut raw,
                        family.0,
                        label_ptrs.as_ptr() as *mut _,
                        label_ptrs.len() as u64,
                        args
                    ))
                });
                let _ = ffi!(sys::TRITONSERVER_MetricArgsDelete(args));
                result
            })
        } else {
            ffi!(sys::TRITONSERVER_MetricNew(
                &mut raw,
                family.0,
                label_ptrs.as_ptr() as *mut _,
                label_ptrs.len() as u64
            ))
        };
        for parameter in parameters {
            // SAFETY: created above, used only by the calls that copied them.
            unsafe { sys::TRITONSERVER_ParameterDelete(parameter) };
        }
        created.map(|()| raw)
    }

    fn add(&self, value: f64) {
        let _ = ffi!(sys::TRITONSERVER_MetricIncrement(self.raw, value));
    }

    fn set(&self, value: f64) {
        let _ = ffi!(sys::TRITONSERVER_MetricSet(self.raw, value));
    }

    fn observe(&self, value: f64) {
        let _ = ffi!(sys::TRITONSERVER_MetricObserve(self.raw, value));
    }
}

impl Drop for Metric {
    fn drop(&mut self) {
        if let Err(e) = ffi!(sys::TRITONSERVER_MetricDelete(self.raw)) {
            tracing::warn!("deleting a metric failed: {e}");
        }
    }
}

/// One instance's metrics, labelled with its model and instance names.
pub struct InstanceMetrics {
    prompt_tokens: Arc<Metric>,
    generated_tokens: Arc<Metric>,
    running: Arc<Metric>,
    waiting: Arc<Metric>,
    cancelled: Arc<Metric>,
    preempted: Arc<Metric>,
    time_to_first_token: Arc<Metric>,
    inter_token_latency: Arc<Metric>,
    kv_blocks_used: Arc<Metric>,
    kv_blocks_free: Arc<Metric>,
    prefix_hit_tokens: Arc<Metric>,
    steps: Arc<Metric>,
    step_sequences: Arc<Metric>,
    /// In the order of `StepTimes::PHASES`.
    step_seconds: Vec<Arc<Metric>>,
    healthy: Arc<Metric>,
    weight_bytes: Arc<Metric>,
    kv_bytes_per_token: Arc<Metric>,
}

impl InstanceMetrics {
    pub fn new(families: &Arc<MetricFamilies>, model: &str, instance: &str) -> TritonResult<Self> {
        let m = |family: fn(&MetricFamilies) -> &Family, name, histogram| {
            Metric::shared(families, family, name, (model, instance), None, histogram)
        };
        let healthy = m(|f| &f.healthy, "healthy", false)?;
        healthy.set(1.0);
        Ok(InstanceMetrics {
            healthy,
            weight_bytes: m(|f| &f.weight_bytes, "weight_bytes", false)?,
            kv_bytes_per_token: m(|f| &f.kv_bytes_per_token, "kv_bytes_per_token", false)?,
            prompt_tokens: m(|f| &f.prompt_tokens, "prompt_tokens", false)?,
            generated_tokens: m(|f| &f.generated_tokens, "generated_tokens", false)?,
            running: m(|f| &f.running, "running", false)?,
            waiting: m(|f| &f.waiting, "waiting", false)?,
            cancelled: m(|f| &f.cancelled, "cancelled", false)?,
            preempted: m(|f| &f.preempted, "preempted", false)?,
            time_to_first_token: m(|f| &f.time_to_first_token, "time_to_first_token", true)?,
            inter_token_latency: m(|f| &f.inter_token_latency, "inter_token_latency", true)?,
            kv_blocks_used: m(|f| &f.kv_blocks_used, "kv_blocks_used", false)?,
            kv_blocks_free: m(|f| &f.kv_blocks_free, "kv_blocks_free", false)?,
            prefix_hit_tokens: m(|f| &f.prefix_hit_tokens, "prefix_hit_tokens", false)?,
            steps: m(|f| &f.steps, "steps", false)?,
            step_sequences: m(|f| &f.step_sequences, "step_sequences", false)?,
            step_seconds: StepTimes::PHASES
                .iter()
                .map(|&phase| {
                    let label = Some(("phase", phase));
                    let family: fn(&MetricFamilies) -> &Family = |f| &f.step_seconds;
                    Metric::shared(
                        families,
                        family,
                        "step_seconds",
                        (model, instance),
                        label,
                        false,
                    )
                })
                .collect::<TritonResult<_>>()?,
        })
    }
}

impl EngineMetrics for InstanceMetrics {
    fn prompt_tokens(&mut self, count: usize) {
        self.prompt_tokens.add(count as f64);
    }

    fn generated_tokens(&mut self, count: usize) {
        self.generated_tokens.add(count as f64);
    }

    fn queue(&mut self, running: usize, waiting: usize) {
        self.running.set(running as f64);
        self.waiting.set(waiting as f64);
    }

    fn time_to_first_token(&mut self, seconds: f64) {
        self.time_to_first_token.observe(seconds);
    }

    fn inter_token_latency(&mut self, seconds: f64) {
        self.inter_token_latency.observe(seconds);
    }

    fn cancelled(&mut self) {
        self.cancelled.add(1.0);
    }

    fn preempted(&mut self) {
        self.preempted.add(1.0);
    }

    fn kv_blocks(&mut self, used: usize, free: usize) {
        self.kv_blocks_used.set(used as f64);
        self.kv_blocks_free.set(free as f64);
    }

    fn prefix_hit_tokens(&mut self, count: usize) {
        if count > 0 {
            self.prefix_hit_tokens.add(count as f64);
        }
    }

    fn failed(&mut self) {
        self.healthy.set(0.0);
    }

    fn memory(&mut self, weight_bytes: usize, kv_bytes_per_token: usize) {
        self.weight_bytes.set(weight_bytes as f64);
        self.kv_bytes_per_token.set(kv_bytes_per_token as f64);
    }

    fn step(&mut self, sequences: usize, times: &StepTimes) {
        self.steps.add(1.0);
        self.step_sequences.add(sequences as f64);
        for (metric, time) in self.step_seconds.iter().zip(times.phases()) {
            metric.add(time.as_secs_f64());
        }
    }
}
