//! Prometheus metrics on the server's metrics port, through Triton's custom metrics API.
//! Families are created per model (the server merges families of the same name); each
//! instance's engine owns its labelled metrics, deleted before the families.

use std::ffi::CString;
use std::ptr;
use std::sync::Arc;

use super::error::{TritonError, TritonResult, ffi};
use super::sys;
use crate::serving::EngineMetrics;

/// Seconds; from a fast CPU step to a slow queue.
const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

struct Family(*mut sys::TRITONSERVER_MetricFamily);

// The server's metric objects are thread-safe; each is used through one owner.
unsafe impl Send for Family {}
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
    time_to_first_token: Family,
    inter_token_latency: Family,
}

impl MetricFamilies {
    pub fn new() -> TritonResult<Arc<Self>> {
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
        }))
    }
}

struct Metric(*mut sys::TRITONSERVER_Metric);

unsafe impl Send for Metric {}

impl Metric {
    fn new(family: &Family, labels: &[(&str, &str)], histogram: bool) -> TritonResult<Self> {
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
        created.map(|()| Metric(raw))
    }

    fn add(&self, value: f64) {
        let _ = ffi!(sys::TRITONSERVER_MetricIncrement(self.0, value));
    }

    fn set(&self, value: f64) {
        let _ = ffi!(sys::TRITONSERVER_MetricSet(self.0, value));
    }

    fn observe(&self, value: f64) {
        let _ = ffi!(sys::TRITONSERVER_MetricObserve(self.0, value));
    }
}

impl Drop for Metric {
    fn drop(&mut self) {
        if let Err(e) = ffi!(sys::TRITONSERVER_MetricDelete(self.0)) {
            tracing::warn!("deleting a metric failed: {e}");
        }
    }
}

/// One instance's metrics, labelled with its model and instance names.
pub struct InstanceMetrics {
    prompt_tokens: Metric,
    generated_tokens: Metric,
    running: Metric,
    waiting: Metric,
    cancelled: Metric,
    time_to_first_token: Metric,
    inter_token_latency: Metric,
    /// Keeps the families alive until these metrics are deleted (fields drop in order).
    _families: Arc<MetricFamilies>,
}

impl InstanceMetrics {
    pub fn new(families: Arc<MetricFamilies>, model: &str, instance: &str) -> TritonResult<Self> {
        let labels = [("model", model), ("instance", instance)];
        let f = &families;
        Ok(InstanceMetrics {
            prompt_tokens: Metric::new(&f.prompt_tokens, &labels, false)?,
            generated_tokens: Metric::new(&f.generated_tokens, &labels, false)?,
            running: Metric::new(&f.running, &labels, false)?,
            waiting: Metric::new(&f.waiting, &labels, false)?,
            cancelled: Metric::new(&f.cancelled, &labels, false)?,
            time_to_first_token: Metric::new(&f.time_to_first_token, &labels, true)?,
            inter_token_latency: Metric::new(&f.inter_token_latency, &labels, true)?,
            _families: families.clone(),
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
}
