//! ModelState: one per loaded model. Holds the validated configuration and the engines
//! of its instances, one per device, so instances on the same device share one copy of
//! the weights.

use std::collections::HashMap;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::{Arc, Mutex};

use super::config::ModelConfig;
use super::error::{TritonError, TritonResult, ffi, owned_string};
use super::metrics::MetricFamilies;
use super::sys;
use crate::model::{self, Device, Family};
use crate::pipeline::{ChatModel, LoadOptions};

pub struct ModelState {
    pub name: String,
    pub config: ModelConfig,
    pub family: Family,
    engines: Mutex<HashMap<Device, Arc<ChatModel>>>,
    /// None when the server's metrics are unavailable (the model still serves).
    pub metrics: Option<Arc<MetricFamilies>>,
}

/// The server's handle of a model, valid between ModelInitialize and ModelFinalize.
#[derive(Clone, Copy)]
pub(crate) struct ModelHandle(pub(crate) *mut sys::TRITONBACKEND_Model);

impl ModelHandle {
    fn name(self) -> TritonResult<String> {
        let mut name = ptr::null();
        ffi!(sys::TRITONBACKEND_ModelName(self.0, &mut name))?;
        // SAFETY: the name lives as long as the model.
        Ok(unsafe { owned_string(name) })
    }

    /// `<repository>/<model>/<version>`: where relative paths of the config point from.
    fn version_dir(self) -> TritonResult<PathBuf> {
        let mut version = 0u64;
        ffi!(sys::TRITONBACKEND_ModelVersion(self.0, &mut version))?;
        let mut artifact = sys::TRITONBACKEND_ARTIFACT_FILESYSTEM;
        let mut location = ptr::null();
        ffi!(sys::TRITONBACKEND_ModelRepository(self.0, &mut artifact, &mut location))?;
        // SAFETY: the location lives as long as the model.
        let location = unsafe { owned_string(location) };
        Ok(Path::new(&location).join(version.to_string()))
    }

    /// The completed model configuration as JSON.
    fn config_json(self) -> TritonResult<String> {
        let mut message = ptr::null_mut();
        ffi!(sys::TRITONBACKEND_ModelConfig(self.0, 1, &mut message))?;
        let mut base = ptr::null();
        let mut size = 0usize;
        let serialized =
            ffi!(sys::TRITONSERVER_MessageSerializeToJson(message, &mut base, &mut size));
        let json = serialized.map(|()| {
            // SAFETY: `size` bytes at `base`, borrowed from the message until it is deleted.
            let bytes = unsafe { std::slice::from_raw_parts(base as *const u8, size) };
            String::from_utf8_lossy(bytes).into_owned()
        });
        ffi!(sys::TRITONSERVER_MessageDelete(message))?;
        json
    }

    /// Attaches the state; ownership passes to the server until `take_state`.
    pub(crate) fn set_state(self, state: Arc<ModelState>) -> TritonResult<()> {
        let raw = Box::into_raw(Box::new(state));
        let result = ffi!(sys::TRITONBACKEND_ModelSetState(self.0, raw as *mut c_void));
        if result.is_err() {
            // SAFETY: the server did not take the pointer; reclaim it once.
            drop(unsafe { Box::from_raw(raw) });
        }
        result
    }

    /// A new reference to the state set by `set_state`.
    pub(crate) fn state(self) -> TritonResult<Arc<ModelState>> {
        let mut raw = ptr::null_mut();
        ffi!(sys::TRITONBACKEND_ModelState(self.0, &mut raw))?;
        if raw.is_null() {
            return Err(TritonError::internal("the model has no state"));
        }
        // SAFETY: set_state stored a Box<Arc<ModelState>> that stays until take_state.
        Ok(Arc::clone(unsafe { &*(raw as *const Arc<ModelState>) }))
    }

    /// Detaches the state for dropping (ModelFinalize).
    pub(crate) fn take_state(self) -> TritonResult<Option<Arc<ModelState>>> {
        let mut raw = ptr::null_mut();
        ffi!(sys::TRITONBACKEND_ModelState(self.0, &mut raw))?;
        if raw.is_null() {
            return Ok(None);
        }
        ffi!(sys::TRITONBACKEND_ModelSetState(self.0, ptr::null_mut()))?;
        // SAFETY: the pointer came from Box::into_raw in set_state and is taken once.
        Ok(Some(*unsafe { Box::from_raw(raw as *mut Arc<ModelState>) }))
    }
}

impl ModelState {
    /// Reads and validates the configuration; fails fast on a model folder whose
    /// `config.json` is missing or names an unsupported family.
    pub(crate) fn load(model: ModelHandle) -> TritonResult<Self> {
        let name = model.name()?;
        let config = ModelConfig::from_json(&model.config_json()?, &model.version_dir()?)?;
        for key in &config.unknown_parameters {
            tracing::warn!("model {name}: unknown parameter {key:?} is ignored");
        }
        let (family, _) = model::read_config(&config.parameters.model_dir)?;
        tracing::info!(
            "model {name}: {} from {}",
            family.name(),
            config.parameters.model_dir.display()
        );
        let metrics = MetricFamilies::shared()
            .inspect_err(|e| tracing::warn!("model {name}: no metrics: {e}"))
            .ok();
        Ok(ModelState { name, config, family, engines: Mutex::new(HashMap::new()), metrics })
    }

    /// The engine for `device`, loaded by the first instance that asks for it.
    pub fn engine(&self, device: Device) -> TritonResult<Arc<ChatModel>> {
        let mut engines = self.engines.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(engine) = engines.get(&device) {
            return Ok(Arc::clone(engine));
        }
        let parameters = &self.config.parameters;
        let options = LoadOptions { device, ..parameters.load.clone() };
        let started = std::time::Instant::now();
        let engine = ChatModel::load(&parameters.model_dir, &options)
            .map(Arc::new)
            .map_err(|e| TritonError::from(e).context(format!("model {}", self.name)))?;
        let info = engine.model.info();
        tracing::info!(
            "model {}: weights loaded for {device:?} in {:.2} s: {}, {:.1} MiB",
            self.name,
            started.elapsed().as_secs_f64(),
            info.weight_format,
            info.weight_bytes as f64 / (1u64 << 20) as f64
        );
        engines.insert(device, Arc::clone(&engine));
        Ok(engine)
    }
}
