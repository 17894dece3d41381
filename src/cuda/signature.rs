//! Each kernel's parameters as the compiled PTX declares them, and the check of a launch's
//! arguments against them: the driver copies each argument's bytes blind, so an argument
//! missing, extra, of the wrong width or an integer where a float is due would make the
//! kernel read garbage. With the check, such a launch is an error naming the kernel and
//! the argument.

use std::collections::HashMap;

use crate::{Error, Result};

/// How a kernel parameter is passed, as PTX declares it. A device address and a 64-bit
/// integer are both `.u64`, and `int` is `.u32`: the check is of widths and of floats
/// against integers, not of signedness or of what an address points to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Param {
    /// `.u64`, `.s64`, `.b64`: a device address, `long long` or `unsigned long long`.
    Word64,
    /// `.u32`, `.s32`, `.b32`: `int` or `unsigned`.
    Word32,
    /// `.f32`: `float`.
    F32,
    /// Anything else (a struct or array by value, a byte, a double): no launch passes it.
    Other,
}

impl Param {
    fn from_ptx_type(ty: &str) -> Param {
        match ty {
            ".u64" | ".s64" | ".b64" => Param::Word64,
            ".u32" | ".s32" | ".b32" => Param::Word32,
            ".f32" => Param::F32,
            _ => Param::Other,
        }
    }

    pub(crate) fn describe(self) -> &'static str {
        match self {
            Param::Word64 => "a 64-bit word (an address or a 64-bit integer)",
            Param::Word32 => "a 32-bit integer",
            Param::F32 => "an f32",
            Param::Other => "a parameter no launch passes (a struct, array, byte or double)",
        }
    }
}

/// The parameters of every `.entry` in `ptx`, by kernel name, in order.
pub(crate) fn entry_params(ptx: &str) -> HashMap<String, Vec<Param>> {
    let mut entries = HashMap::new();
    let mut lines = ptx.lines();
    while let Some(line) = lines.next() {
        let Some((_, rest)) = line.split_once(".entry ") else {
            continue;
        };
        let (name, after) = rest.split_once('(').unwrap_or((rest, ""));
        let mut params = Vec::new();
        // `.entry f()` on one line has no parameters; otherwise one `.param` a line up to ")".
        if !after.trim_start().starts_with(')') {
            for line in lines.by_ref() {
                let line = line.trim();
                if line.starts_with(')') {
                    break;
                }
                if let Some(decl) = line.strip_prefix(".param") {
                    let ty = decl.split_whitespace().next().unwrap_or("");
                    params.push(Param::from_ptx_type(ty));
                }
            }
        }
        entries.insert(name.trim().to_string(), params);
    }
    entries
}

/// Checks `args` against the parameters `params` of the kernel `name`: their count, and
/// each one's width and kind.
pub(super) fn check_args(
    name: &str,
    params: &[Param],
    args: impl ExactSizeIterator<Item = Param>,
) -> Result<()> {
    if args.len() != params.len() {
        return Err(Error::Internal(format!(
            "launching {name}: {} arguments for its {} parameters",
            args.len(),
            params.len()
        )));
    }
    for (index, (arg, &param)) in args.zip(params).enumerate() {
        if param == Param::Other || arg != param {
            return Err(Error::Internal(format!(
                "launching {name}: argument {index} is {}, the kernel's parameter is {}",
                arg.describe(),
                param.describe()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PTX: &str = "
.version 8.5
.target sm_90
.address_size 64

.visible .entry scale_rows(
\t.param .u64 .ptr .align 1 scale_rows_param_0,
\t.param .u64 scale_rows_param_1,
\t.param .f32 scale_rows_param_2,
\t.param .u32 scale_rows_param_3
)
.maxntid 256, 1, 1
{
\t.reg .b32 %r<4>;
\tret;
}

.visible .entry no_params()
{
\tret;
}

.visible .entry by_value(
\t.param .align 8 .b8 by_value_param_0[16],
\t.param .s32 by_value_param_1
)
{
\tret;
}
";

    #[test]
    fn entries_and_their_parameters_are_read_from_the_ptx() {
        let entries = entry_params(PTX);
        assert_eq!(entries.len(), 3);
        assert_eq!(
            entries["scale_rows"],
            [Param::Word64, Param::Word64, Param::F32, Param::Word32]
        );
        assert_eq!(entries["no_params"], []);
        assert_eq!(entries["by_value"], [Param::Other, Param::Word32]);
    }

    #[test]
    fn a_launch_must_pass_what_the_kernel_declares() {
        let params = &entry_params(PTX)["scale_rows"];
        let good = [Param::Word64, Param::Word64, Param::F32, Param::Word32];
        check_args("scale_rows", params, good.into_iter()).unwrap();

        let short = check_args("scale_rows", params, good[..3].iter().copied()).unwrap_err();
        assert!(short.to_string().contains("3 arguments for its 4 parameters"), "{short}");

        let mut narrow = good;
        narrow[1] = Param::Word32;
        let error = check_args("scale_rows", params, narrow.into_iter()).unwrap_err();
        assert!(
            error.to_string().contains("scale_rows: argument 1 is a 32-bit integer"),
            "{error}"
        );

        let mut integer = good;
        integer[2] = Param::Word32;
        let error = check_args("scale_rows", params, integer.into_iter()).unwrap_err();
        assert!(error.to_string().contains("parameter is an f32"), "{error}");
    }

    #[test]
    fn a_parameter_no_argument_can_match_fails_every_launch() {
        let params = &entry_params(PTX)["by_value"];
        let error =
            check_args("by_value", params, [Param::Other, Param::Word32].into_iter()).unwrap_err();
        assert!(error.to_string().contains("argument 0"), "{error}");
    }
}
