//! Faults a test can ask for, to prove that every request still gets exactly one final
//! answer when a part of the backend fails. With the cargo feature `fault-injection` (built
//! only for tests), a request whose prompt starts with `fault:<name>` makes that part fail;
//! without it, `requested` is always None and such prompts are ordinary text.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Execute panics while it takes the request in.
    ExecutePanic,
    /// The engine thread panics when it receives the request.
    EnginePanic,
    /// The forward pass that runs the request fails; the engine goes on.
    StepError,
    /// The forward pass that runs the request loses the device; the engine stops.
    DeviceLost,
    /// The engine drops the request's sink without answering it.
    SinkDropped,
    /// Sending the request's final response fails.
    FinalSendFails,
}

const NAMES: [(&str, Fault); 6] = [
    ("execute-panic", Fault::ExecutePanic),
    ("engine-panic", Fault::EnginePanic),
    ("step-error", Fault::StepError),
    ("device-lost", Fault::DeviceLost),
    ("sink-dropped", Fault::SinkDropped),
    ("final-send-fails", Fault::FinalSendFails),
];

/// The fault a prompt asks for (`fault:<name>…`), when fault injection is built in.
pub fn requested(prompt: &str) -> Option<Fault> {
    if !cfg!(feature = "fault-injection") {
        return None;
    }
    let name = prompt.strip_prefix("fault:")?;
    NAMES.iter().find(|(n, _)| name.starts_with(n)).map(|&(_, fault)| fault)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_ask_for_faults_only_when_built_for_it() {
        let asked = requested("fault:device-lost please");
        if cfg!(feature = "fault-injection") {
            assert_eq!(asked, Some(Fault::DeviceLost));
            assert_eq!(requested("fault:execute-panic"), Some(Fault::ExecutePanic));
            assert_eq!(requested("fault:nothing"), None);
        } else {
            assert_eq!(asked, None);
        }
        assert_eq!(requested("hello fault:step-error"), None);
    }
}
