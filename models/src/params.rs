//! Parameter-tree utilities every command uses: list a module's parameters by zoo name (from lazy
//! shapes, so even a 175B preset costs nothing), count them, cast them.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::FloatDType;
use burn::tensor::{Tensor, backend::Backend};

/// One float parameter of a module: its zoo name and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    /// Dotted path, e.g. `bert.encoder.layers.0.attention.query.weight`.
    pub name: String,
    /// Dimensions.
    pub shape: Vec<usize>,
}

/// The dotted zoo name of the parameter a [`ModuleVisitor`] is at: call [`ParamPath::enter`] and
/// [`ParamPath::exit`] from the visitor's `enter_module` / `exit_module`.
#[derive(Debug, Default)]
pub struct ParamPath {
    segments: Vec<String>,
}

impl ParamPath {
    /// Enters a sub-module. Enum variants (such as [`crate::AnyModel`]'s) are not part of zoo names.
    pub fn enter(&mut self, name: &str, container_type: &str) {
        if !container_type.starts_with("Enum:") {
            self.segments.push(name.to_string());
        }
    }

    /// Leaves the sub-module entered last.
    pub fn exit(&mut self, container_type: &str) {
        if !container_type.starts_with("Enum:") {
            self.segments.pop();
        }
    }

    /// The current name, e.g. `bert.encoder.layers.0.attention.query.weight`.
    pub fn name(&self) -> String {
        self.segments.join(".")
    }
}

/// Lists a module's float parameters without initialising them (lazy shapes only), so this is
/// cheap even for a 175B preset.
pub fn param_infos<B: Backend, M: Module<B>>(module: &M) -> Vec<ParamInfo> {
    #[derive(Default)]
    struct Lister {
        path: ParamPath,
        params: Vec<ParamInfo>,
    }
    impl<B: Backend> ModuleVisitor<B> for Lister {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, container_type: &str) {
            self.path.exit(container_type);
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.params.push(ParamInfo {
                name: self.path.name(),
                shape: param.lazy_shape().to_vec(),
            });
        }
    }
    let mut lister = Lister::default();
    module.visit(&mut lister);
    lister.params
}

/// Casts every float parameter of a module to `dtype` (f16 / bf16 inference, or back to f32).
pub fn cast_float_params<B: Backend, M: Module<B>>(module: M, dtype: FloatDType) -> M {
    struct Cast(FloatDType);
    impl<B: Backend> ModuleMapper<B> for Cast {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let dtype = self.0;
            param.map(|tensor| tensor.cast(dtype))
        }
    }
    module.map(&mut Cast(dtype))
}

/// Number of float parameters, from lazy shapes.
pub fn count_params<B: Backend, M: Module<B>>(module: &M) -> usize {
    param_infos::<B, M>(module)
        .iter()
        .map(|p| p.shape.iter().product::<usize>())
        .sum()
}

/// Each float parameter's zoo name by its id (from the module tree; nothing is initialised).
pub fn param_names<B: Backend, M: Module<B>>(module: &M) -> HashMap<ParamId, String> {
    #[derive(Default)]
    struct Namer {
        path: ParamPath,
        names: HashMap<ParamId, String>,
    }
    impl<B: Backend> ModuleVisitor<B> for Namer {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, container_type: &str) {
            self.path.exit(container_type);
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.names.insert(param.id, self.path.name());
        }
    }
    let mut namer = Namer::default();
    module.visit(&mut namer);
    namer.names
}
