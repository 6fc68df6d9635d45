// libtorch adapter (target dcpp::torch): DCP checkpoints of torch::nn::Module and torch::optim
// state, with the keys PyTorch's Python side uses, so a C++ libtorch program and a Python job
// read each other's checkpoints.
//
// Keys: ModelStateDict is Python's `model.state_dict()`: every parameter and buffer under its
// dotted name ("fc1.weight", "bn.running_mean"). OptimizerStateDict is the optimizer half of
// `torch.distributed.checkpoint.state_dict.get_state_dict(model, optim)`:
//   {"state": {fqn: {"step": float32 0-d, "exp_avg": ..., ...}},
//    "param_groups": [{"lr": ..., <the Python optimizer's other options>, "params": [fqn, ...]}]}
// Adam, AdamW and SGD are mapped (their Python option names, with the values libtorch implies for
// options it lacks, e.g. "maximize": False); other optimizers are Unimplemented.
//
// Zero copy: FromAten and ToAten share memory both ways (each side keeps the other's storage
// alive), so Save reads straight from the module's tensors and Load writes into them in place.
// Only CPU tensors are supported. Missing optimizer state (a parameter never stepped) is created
// as zeros, as Python's get_state_dict does, so a fresh optimizer can be loaded into.
//
// Thread-safety: like the module and optimizer themselves: one thread at a time, and no training
// step while a Save or Load that uses their tensors is running.
#pragma once

#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#include <string>

#include "dcpp/checkpoint.h"
#include "dcpp/dtype.h"
#include "dcpp/state_dict.h"
#include "dcpp/status.h"
#include "dcpp/tensor.h"

namespace dcpp::libtorch {

Result<DType> FromScalarType(c10::ScalarType type);
Result<c10::ScalarType> ToScalarType(DType dtype);

// A dcpp tensor sharing `t`'s memory (any strides); it keeps `t`'s storage alive.
Result<Tensor> FromAten(const at::Tensor& t);
// An at::Tensor sharing `t`'s memory; it keeps `t`'s storage alive.
Result<at::Tensor> ToAten(const Tensor& t);

// {fqn: tensor} of `module`'s parameters and buffers, sharing their memory.
Result<StateDict> ModelStateDict(const torch::nn::Module& module);

// {"state": ..., "param_groups": ...} of `optimizer`, keyed by `module`'s parameter names;
// tensors share the optimizer's memory (missing per-parameter state is created first).
// InvalidArgument if the optimizer holds a parameter that is not one of the module's.
Result<StateDict> OptimizerStateDict(const torch::nn::Module& module,
                                     torch::optim::Optimizer& optimizer);
// Applies a loaded optimizer state dict: tensors are copied in (a no-op for the ones Load filled
// in place), step counts and the options of each param group (lr, betas, ...) are set.
Status SetOptimizerStateDict(const torch::nn::Module& module, torch::optim::Optimizer& optimizer,
                             const StateDict& state_dict);

// Saves {"model": ModelStateDict, "optim": OptimizerStateDict} (optim left out when null): what
// Python loads with dcp.load({"model": msd, "optim": osd}) after get_state_dict(model, optim).
// Collective when options.comm is set; every rank passes its replica of the module. A rank whose
// state dict cannot be built (an unmapped optimizer, a CUDA tensor, a libtorch exception) still
// takes part in every collective step, so all ranks return the same error and none hangs.
Result<Metadata> Save(torch::nn::Module& module, torch::optim::Optimizer* optimizer,
                      const std::string& path, const SaveOptions& options = {});
// Loads such a checkpoint (also one Python wrote that way) into `module` and `optimizer` in place;
// collective like Save. Applying the loaded optimizer options afterwards is local to each rank.
Status Load(torch::nn::Module& module, torch::optim::Optimizer* optimizer, const std::string& path,
            const LoadOptions& options = {});

}  // namespace dcpp::libtorch
