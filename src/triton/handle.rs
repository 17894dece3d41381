//! The server's handle of a model instance, apart from the instance's state, so that what
//! answers requests (`sink`) and what receives them (`instance`) both use it without
//! depending on each other.

use super::sys;

/// The server's handle of an instance, valid between its Initialize and Finalize.
#[derive(Clone, Copy)]
pub(crate) struct InstanceHandle(pub(crate) *mut sys::TRITONBACKEND_ModelInstance);

// SAFETY: the server allows its instance handle to be used from any thread between the
// instance's Initialize and Finalize (statistics are reported from the engine's threads),
// and the handle itself is only a pointer the server owns.
unsafe impl Send for InstanceHandle {}
// SAFETY: as for Send; the calls made with it take no lock of ours.
unsafe impl Sync for InstanceHandle {}
