#include "dcpp/libtorch.h"

#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>

#include <map>
#include <memory>
#include <utility>

namespace dcpp::libtorch {
namespace {

constexpr std::pair<c10::ScalarType, DType> kTypes[] = {
    {c10::ScalarType::Bool, DType::kBool},
    {c10::ScalarType::Byte, DType::kUInt8},
    {c10::ScalarType::Char, DType::kInt8},
    {c10::ScalarType::Short, DType::kInt16},
    {c10::ScalarType::Int, DType::kInt32},
    {c10::ScalarType::Long, DType::kInt64},
    {c10::ScalarType::Half, DType::kFloat16},
    {c10::ScalarType::BFloat16, DType::kBFloat16},
    {c10::ScalarType::Float, DType::kFloat32},
    {c10::ScalarType::Double, DType::kFloat64},
    {c10::ScalarType::ComplexHalf, DType::kComplex32},
    {c10::ScalarType::ComplexFloat, DType::kComplex64},
    {c10::ScalarType::ComplexDouble, DType::kComplex128},
};

// The optimizer's key for a parameter's state (libtorch keys state by TensorImpl address).
std::string StateKey(const at::Tensor& p) { return c10::guts::to_string(p.unsafeGetTensorImpl()); }

// fqn of every parameter of `module`, by TensorImpl.
std::map<const void*, std::string> ParameterNames(const torch::nn::Module& module) {
  std::map<const void*, std::string> names;
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    names.emplace(item.value().unsafeGetTensorImpl(), item.key());
  }
  return names;
}

Result<Value> TensorValue(const at::Tensor& t, const std::string& what) {
  auto v = FromAten(t);
  if (!v.ok()) return Status(v.status().code(), what + ": " + std::string(v.status().message()));
  return Value::FromTensor(std::move(*v));
}

// A 0-d float32 tensor: Python's Adam keeps `step` as one (torch >= 1.12).
Value StepValue(int64_t step) {
  Tensor t = Tensor::Zeros(DType::kFloat32, {});
  *t.data_as<float>() = static_cast<float>(step);
  return Value::FromTensor(t);
}

Result<int64_t> StepFrom(const Value* v, const std::string& what) {
  if (v == nullptr) return InvalidArgumentError(what + ": no \"step\"");
  if (v->is_int()) return v->as_int();
  if (v->is_float()) return static_cast<int64_t>(v->as_float());
  if (v->is_tensor() && v->tensor().numel() == 1) {
    const Tensor& t = v->tensor();
    switch (t.dtype()) {
      case DType::kFloat32:
        return static_cast<int64_t>(*t.data_as<float>());
      case DType::kFloat64:
        return static_cast<int64_t>(*t.data_as<double>());
      case DType::kInt64:
        return *t.data_as<int64_t>();
      default:
        break;
    }
  }
  return InvalidArgumentError(what + ": \"step\" is not a number or a one-element tensor");
}

Result<double> NumberFrom(const Value& group, const char* key, const std::string& what) {
  const Value* v = group.Find(key);
  if (v == nullptr) return InvalidArgumentError(what + ": no \"" + key + "\"");
  if (v->is_float()) return v->as_float();
  if (v->is_int()) return static_cast<double>(v->as_int());
  return InvalidArgumentError(what + ": \"" + key + "\" is a " + std::string(KindName(v->kind())) +
                              ", not a number");
}

Result<bool> BoolFrom(const Value& group, const char* key, const std::string& what) {
  const Value* v = group.Find(key);
  if (v == nullptr) return InvalidArgumentError(what + ": no \"" + key + "\"");
  if (v->is_bool()) return v->as_bool();
  return InvalidArgumentError(what + ": \"" + key + "\" is not a bool");
}

// Per-parameter state of the optimizers the adapter maps. `create` makes a zero state when the
// parameter has none yet.
enum class Kind { kAdam, kAdamW, kSgd };

Result<Kind> KindOf(torch::optim::Optimizer& optimizer) {
  if (dynamic_cast<torch::optim::Adam*>(&optimizer)) return Kind::kAdam;
  if (dynamic_cast<torch::optim::AdamW*>(&optimizer)) return Kind::kAdamW;
  if (dynamic_cast<torch::optim::SGD*>(&optimizer)) return Kind::kSgd;
  return UnimplementedError(
      "libtorch adapter: only Adam, AdamW and SGD optimizers are mapped to PyTorch's keys");
}

template <typename State>
State& GetOrCreate(torch::optim::Optimizer& optimizer, const at::Tensor& p) {
  auto& slot = optimizer.state()[StateKey(p)];
  if (!slot) slot = std::make_unique<State>();
  return static_cast<State&>(*slot);
}

// Adam and AdamW share their state's shape; AdamW's Python option differs only in
// decoupled_weight_decay.
template <typename State>
Result<Value> AdamStateFor(torch::optim::Optimizer& optimizer, const at::Tensor& p, bool amsgrad,
                           const std::string& fqn) {
  State& s = GetOrCreate<State>(optimizer, p);
  at::NoGradGuard no_grad;
  if (!s.exp_avg().defined()) s.exp_avg(torch::zeros_like(p, at::MemoryFormat::Preserve));
  if (!s.exp_avg_sq().defined()) s.exp_avg_sq(torch::zeros_like(p, at::MemoryFormat::Preserve));
  if (amsgrad && !s.max_exp_avg_sq().defined()) {
    s.max_exp_avg_sq(torch::zeros_like(p, at::MemoryFormat::Preserve));
  }
  Value d = Value::MakeDict();
  d.Set("step", StepValue(s.step()));
  DCPP_ASSIGN_OR_RETURN(Value avg, TensorValue(s.exp_avg(), "state." + fqn + ".exp_avg"));
  d.Set("exp_avg", std::move(avg));
  DCPP_ASSIGN_OR_RETURN(Value sq, TensorValue(s.exp_avg_sq(), "state." + fqn + ".exp_avg_sq"));
  d.Set("exp_avg_sq", std::move(sq));
  if (amsgrad) {
    DCPP_ASSIGN_OR_RETURN(Value mx,
                          TensorValue(s.max_exp_avg_sq(), "state." + fqn + ".max_exp_avg_sq"));
    d.Set("max_exp_avg_sq", std::move(mx));
  }
  return d;
}

Value Betas(const std::tuple<double, double>& b) {
  return Value::MakeTuple({Value::Float(std::get<0>(b)), Value::Float(std::get<1>(b))});
}

// One param group's options under Python's names. `python_defaults` adds the options Python's
// optimizer has and libtorch's lacks, with the values libtorch's behaviour corresponds to (what a
// save writes, so Python's get_state_dict template finds every key); a load asks only for the
// options libtorch has.
void AddOptions(Kind kind, const torch::optim::OptimizerOptions& options, bool python_defaults,
                Value& group) {
  switch (kind) {
    case Kind::kAdam:
    case Kind::kAdamW: {
      double lr, eps, wd;
      bool amsgrad;
      std::tuple<double, double> betas;
      if (kind == Kind::kAdam) {
        const auto& o = static_cast<const torch::optim::AdamOptions&>(options);
        lr = o.lr(), eps = o.eps(), wd = o.weight_decay(), amsgrad = o.amsgrad(), betas = o.betas();
      } else {
        const auto& o = static_cast<const torch::optim::AdamWOptions&>(options);
        lr = o.lr(), eps = o.eps(), wd = o.weight_decay(), amsgrad = o.amsgrad(), betas = o.betas();
      }
      group.Set("lr", Value::Float(lr));
      group.Set("betas", Betas(betas));
      group.Set("eps", Value::Float(eps));
      group.Set("weight_decay", Value::Float(wd));
      group.Set("amsgrad", Value::Bool(amsgrad));
      if (python_defaults) {
        group.Set("maximize", Value::Bool(false));
        group.Set("foreach", Value::None());
        group.Set("capturable", Value::Bool(false));
        group.Set("differentiable", Value::Bool(false));
        group.Set("fused", Value::None());
        group.Set("decoupled_weight_decay", Value::Bool(kind == Kind::kAdamW));
      }
      break;
    }
    case Kind::kSgd: {
      const auto& o = static_cast<const torch::optim::SGDOptions&>(options);
      group.Set("lr", Value::Float(o.lr()));
      group.Set("momentum", Value::Float(o.momentum()));
      group.Set("dampening", Value::Float(o.dampening()));
      group.Set("weight_decay", Value::Float(o.weight_decay()));
      group.Set("nesterov", Value::Bool(o.nesterov()));
      if (python_defaults) {
        group.Set("maximize", Value::Bool(false));
        group.Set("foreach", Value::None());
        group.Set("differentiable", Value::Bool(false));
        group.Set("fused", Value::None());
      }
      break;
    }
  }
}

Status ApplyOptions(Kind kind, const Value& group, const std::string& what,
                    torch::optim::OptimizerOptions& options) {
  DCPP_ASSIGN_OR_RETURN(double lr, NumberFrom(group, "lr", what));
  DCPP_ASSIGN_OR_RETURN(double wd, NumberFrom(group, "weight_decay", what));
  if (kind == Kind::kSgd) {
    auto& o = static_cast<torch::optim::SGDOptions&>(options);
    DCPP_ASSIGN_OR_RETURN(double momentum, NumberFrom(group, "momentum", what));
    DCPP_ASSIGN_OR_RETURN(double dampening, NumberFrom(group, "dampening", what));
    DCPP_ASSIGN_OR_RETURN(bool nesterov, BoolFrom(group, "nesterov", what));
    o.lr(lr).weight_decay(wd).momentum(momentum).dampening(dampening).nesterov(nesterov);
    return Status();
  }
  DCPP_ASSIGN_OR_RETURN(double eps, NumberFrom(group, "eps", what));
  DCPP_ASSIGN_OR_RETURN(bool amsgrad, BoolFrom(group, "amsgrad", what));
  const Value* betas = group.Find("betas");
  if (betas == nullptr || !(betas->is_tuple() || betas->is_list()) || betas->items().size() != 2) {
    return InvalidArgumentError(what + ": \"betas\" is not a pair");
  }
  double b[2];
  for (int i = 0; i < 2; ++i) {
    const Value& x = betas->items()[i];
    if (!x.is_float() && !x.is_int()) return InvalidArgumentError(what + ": \"betas\" not numbers");
    b[i] = x.is_float() ? x.as_float() : static_cast<double>(x.as_int());
  }
  if (kind == Kind::kAdam) {
    static_cast<torch::optim::AdamOptions&>(options)
        .lr(lr)
        .weight_decay(wd)
        .eps(eps)
        .amsgrad(amsgrad)
        .betas({b[0], b[1]});
  } else {
    static_cast<torch::optim::AdamWOptions&>(options)
        .lr(lr)
        .weight_decay(wd)
        .eps(eps)
        .amsgrad(amsgrad)
        .betas({b[0], b[1]});
  }
  return Status();
}

bool Amsgrad(Kind kind, const torch::optim::OptimizerOptions& options) {
  if (kind == Kind::kAdam) return static_cast<const torch::optim::AdamOptions&>(options).amsgrad();
  if (kind == Kind::kAdamW) {
    return static_cast<const torch::optim::AdamWOptions&>(options).amsgrad();
  }
  return false;
}

Result<StateDict> OptimizerStateDictImpl(const torch::nn::Module& module,
                                         torch::optim::Optimizer& optimizer, bool python_defaults) {
  DCPP_ASSIGN_OR_RETURN(Kind kind, KindOf(optimizer));
  const auto names = ParameterNames(module);
  Value state = Value::MakeDict();
  Value groups = Value::MakeList();
  for (size_t g = 0; g < optimizer.param_groups().size(); ++g) {
    auto& group = optimizer.param_groups()[g];
    Value params = Value::MakeList();
    const bool amsgrad = Amsgrad(kind, group.options());
    for (const at::Tensor& p : group.params()) {
      auto it = names.find(p.unsafeGetTensorImpl());
      if (it == names.end()) {
        return InvalidArgumentError("optimizer param group " + std::to_string(g) +
                                    " holds a tensor that is not a parameter of the module");
      }
      const std::string& fqn = it->second;
      params.items().push_back(Value::Str(fqn));
      Value s;
      switch (kind) {
        case Kind::kAdam: {
          DCPP_ASSIGN_OR_RETURN(
              s, AdamStateFor<torch::optim::AdamParamState>(optimizer, p, amsgrad, fqn));
          break;
        }
        case Kind::kAdamW: {
          DCPP_ASSIGN_OR_RETURN(
              s, AdamStateFor<torch::optim::AdamWParamState>(optimizer, p, amsgrad, fqn));
          break;
        }
        case Kind::kSgd: {
          // Python's SGD keeps a momentum_buffer only when momentum is used.
          const auto& o = static_cast<const torch::optim::SGDOptions&>(group.options());
          if (o.momentum() == 0) continue;
          auto& ps = GetOrCreate<torch::optim::SGDParamState>(optimizer, p);
          if (!ps.momentum_buffer().defined()) {
            at::NoGradGuard no_grad;
            ps.momentum_buffer(torch::zeros_like(p, at::MemoryFormat::Preserve));
          }
          s = Value::MakeDict();
          DCPP_ASSIGN_OR_RETURN(
              Value buf, TensorValue(ps.momentum_buffer(), "state." + fqn + ".momentum_buffer"));
          s.Set("momentum_buffer", std::move(buf));
          break;
        }
      }
      state.Set(fqn, std::move(s));
    }
    Value gv = Value::MakeDict();
    AddOptions(kind, group.options(), python_defaults, gv);
    gv.Set("params", std::move(params));
    groups.items().push_back(std::move(gv));
  }
  Value out = Value::MakeDict();
  out.Set("state", std::move(state));
  out.Set("param_groups", std::move(groups));
  return out;
}

// Copies `src` into `dst` unless Load already filled dst in place (same memory).
Status CopyInto(const at::Tensor& dst, const Value* src, const std::string& what) {
  if (src == nullptr || !src->is_tensor()) return InvalidArgumentError(what + ": no tensor");
  DCPP_ASSIGN_OR_RETURN(Tensor d, FromAten(dst));
  const Tensor& s = src->tensor();
  if (s.data() == d.data() && s.strides() == d.strides()) return Status();
  if (s.shape() != d.shape() || s.dtype() != d.dtype()) {
    return InvalidArgumentError(what + ": stored " + std::string(DTypeName(s.dtype())) +
                                ShapeToString(s.shape()) + ", optimizer has " +
                                std::string(DTypeName(d.dtype())) + ShapeToString(d.shape()));
  }
  return CopyTensor(d.view(), s.view());
}

}  // namespace

Result<DType> FromScalarType(c10::ScalarType type) {
  for (const auto& [st, dt] : kTypes) {
    if (st == type) return dt;
  }
  return UnimplementedError(std::string("libtorch dtype ") + c10::toString(type) +
                            " has no dcpp dtype");
}

Result<c10::ScalarType> ToScalarType(DType dtype) {
  for (const auto& [st, dt] : kTypes) {
    if (dt == dtype) return st;
  }
  return UnimplementedError("dtype " + std::string(DTypeName(dtype)) +
                            " has no scalar type in this libtorch");
}

Result<Tensor> FromAten(const at::Tensor& t) {
  if (!t.defined()) return InvalidArgumentError("undefined at::Tensor");
  if (!t.device().is_cpu()) {
    return UnimplementedError("at::Tensor on " + t.device().str() +
                              ": only CPU tensors are shared");
  }
  DCPP_ASSIGN_OR_RETURN(DType dtype, FromScalarType(t.scalar_type()));
  Shape shape(t.sizes().begin(), t.sizes().end());
  Shape strides(t.strides().begin(), t.strides().end());
  if (t.numel() == 0) return Tensor::Zeros(dtype, shape);
  const c10::Storage& storage = t.storage();
  auto wrapped = Storage::Wrap(storage.unsafeGetStorageImpl()->data(), storage.nbytes(),
                               Device::CPU(), [keep = t] {});
  return Tensor::FromStorage(std::move(wrapped), dtype, std::move(shape), std::move(strides),
                             t.storage_offset());
}

Result<at::Tensor> ToAten(const Tensor& t) {
  if (!t.defined()) return InvalidArgumentError("undefined dcpp tensor");
  if (!t.storage()->device().is_cpu()) {
    return UnimplementedError("dcpp tensor on " + t.storage()->device().ToString() +
                              ": only CPU tensors are shared");
  }
  DCPP_ASSIGN_OR_RETURN(c10::ScalarType type, ToScalarType(t.dtype()));
  std::vector<int64_t> sizes(t.shape().begin(), t.shape().end());
  std::vector<int64_t> strides(t.strides().begin(), t.strides().end());
  auto keep = t.storage();
  return torch::from_blob(
      t.data(), sizes, strides, [keep](void*) mutable { keep.reset(); },
      at::TensorOptions().dtype(type).device(at::kCPU));
}

Result<StateDict> ModelStateDict(const torch::nn::Module& module) {
  Value sd = Value::MakeDict();
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    DCPP_ASSIGN_OR_RETURN(Value v, TensorValue(item.value(), item.key()));
    sd.Set(item.key(), std::move(v));
  }
  for (const auto& item : module.named_buffers(/*recurse=*/true)) {
    if (!item.value().defined()) continue;  // e.g. BatchNorm without running stats
    DCPP_ASSIGN_OR_RETURN(Value v, TensorValue(item.value(), item.key()));
    sd.Set(item.key(), std::move(v));
  }
  return sd;
}

Result<StateDict> OptimizerStateDict(const torch::nn::Module& module,
                                     torch::optim::Optimizer& optimizer) {
  return OptimizerStateDictImpl(module, optimizer, /*python_defaults=*/true);
}

Status SetOptimizerStateDict(const torch::nn::Module& module, torch::optim::Optimizer& optimizer,
                             const StateDict& state_dict) {
  DCPP_ASSIGN_OR_RETURN(Kind kind, KindOf(optimizer));
  const Value* state = state_dict.Find("state");
  const Value* groups = state_dict.Find("param_groups");
  if (state == nullptr || !state->is_dict() || groups == nullptr || !groups->is_list()) {
    return InvalidArgumentError(
        "optimizer state dict needs a \"state\" dict and a "
        "\"param_groups\" list");
  }
  if (groups->items().size() != optimizer.param_groups().size()) {
    return InvalidArgumentError(
        "optimizer state dict has " + std::to_string(groups->items().size()) +
        " param groups, the optimizer " + std::to_string(optimizer.param_groups().size()));
  }
  const auto names = ParameterNames(module);
  at::NoGradGuard no_grad;
  for (size_t g = 0; g < optimizer.param_groups().size(); ++g) {
    auto& group = optimizer.param_groups()[g];
    const std::string what = "param_groups." + std::to_string(g);
    DCPP_RETURN_IF_ERROR(ApplyOptions(kind, groups->items()[g], what, group.options()));
    const bool amsgrad = Amsgrad(kind, group.options());
    for (const at::Tensor& p : group.params()) {
      auto it = names.find(p.unsafeGetTensorImpl());
      if (it == names.end()) {
        return InvalidArgumentError(what + " holds a tensor that is not a parameter of the module");
      }
      const std::string& fqn = it->second;
      const Value* s = state->Find(fqn);
      if (kind == Kind::kSgd) {
        const auto& o = static_cast<const torch::optim::SGDOptions&>(group.options());
        if (s == nullptr && o.momentum() == 0) continue;
        if (s == nullptr) return InvalidArgumentError("state." + fqn + ": missing");
        auto& ps = GetOrCreate<torch::optim::SGDParamState>(optimizer, p);
        if (!ps.momentum_buffer().defined()) {
          ps.momentum_buffer(torch::zeros_like(p, at::MemoryFormat::Preserve));
        }
        DCPP_RETURN_IF_ERROR(CopyInto(ps.momentum_buffer(), s->Find("momentum_buffer"),
                                      "state." + fqn + ".momentum_buffer"));
        continue;
      }
      if (s == nullptr || !s->is_dict()) return InvalidArgumentError("state." + fqn + ": missing");
      auto apply = [&](auto& ps) -> Status {
        if (!ps.exp_avg().defined()) ps.exp_avg(torch::zeros_like(p, at::MemoryFormat::Preserve));
        if (!ps.exp_avg_sq().defined()) {
          ps.exp_avg_sq(torch::zeros_like(p, at::MemoryFormat::Preserve));
        }
        DCPP_ASSIGN_OR_RETURN(int64_t step, StepFrom(s->Find("step"), "state." + fqn));
        ps.step(step);
        DCPP_RETURN_IF_ERROR(
            CopyInto(ps.exp_avg(), s->Find("exp_avg"), "state." + fqn + ".exp_avg"));
        DCPP_RETURN_IF_ERROR(
            CopyInto(ps.exp_avg_sq(), s->Find("exp_avg_sq"), "state." + fqn + ".exp_avg_sq"));
        if (amsgrad) {
          if (!ps.max_exp_avg_sq().defined()) {
            ps.max_exp_avg_sq(torch::zeros_like(p, at::MemoryFormat::Preserve));
          }
          DCPP_RETURN_IF_ERROR(CopyInto(ps.max_exp_avg_sq(), s->Find("max_exp_avg_sq"),
                                        "state." + fqn + ".max_exp_avg_sq"));
        }
        return Status();
      };
      if (kind == Kind::kAdam) {
        DCPP_RETURN_IF_ERROR(apply(GetOrCreate<torch::optim::AdamParamState>(optimizer, p)));
      } else {
        DCPP_RETURN_IF_ERROR(apply(GetOrCreate<torch::optim::AdamWParamState>(optimizer, p)));
      }
    }
  }
  return Status();
}

namespace {

// Stand-ins for the planners on a rank whose state dict could not be built: every step fails with
// that status, so the rank still joins the collectives and every rank returns the same error.
class FailedSavePlanner final : public SavePlanner {
 public:
  explicit FailedSavePlanner(Status s) : s_(std::move(s)) {}
  Status SetUp(const StateDict&, bool) override { return s_; }
  Result<SavePlan> CreateLocalPlan() override { return s_; }
  Result<std::pair<std::vector<SavePlan>, Metadata>> CreateGlobalPlan(
      std::vector<SavePlan>) override {
    return s_;
  }
  Result<SavePlan> FinishPlan(SavePlan) override { return s_; }
  Result<WriteData> ResolveData(const WriteItem&) override { return s_; }

 private:
  Status s_;
};

class FailedLoadPlanner final : public LoadPlanner {
 public:
  explicit FailedLoadPlanner(Status s) : s_(std::move(s)) {}
  Status SetUp(StateDict*, const Metadata&, bool) override { return s_; }
  Result<LoadPlan> CreateLocalPlan() override { return s_; }
  Result<TensorView> ResolveTensor(const ReadItem&) override { return s_; }
  Status LoadBytes(const ReadItem&, Value) override { return s_; }

 private:
  Status s_;
};

// {"model": ..., "optim": ...}; libtorch's exceptions (allocation of missing optimizer state)
// become Status values here, before any collective.
Result<StateDict> BuildStateDict(torch::nn::Module& module, torch::optim::Optimizer* optimizer,
                                 bool python_defaults) {
  try {
    Value sd = Value::MakeDict();
    DCPP_ASSIGN_OR_RETURN(Value model, ModelStateDict(module));
    sd.Set("model", std::move(model));
    if (optimizer != nullptr) {
      DCPP_ASSIGN_OR_RETURN(Value optim,
                            OptimizerStateDictImpl(module, *optimizer, python_defaults));
      sd.Set("optim", std::move(optim));
    }
    return sd;
  } catch (const std::exception& e) {
    return InternalError(std::string("libtorch: ") + e.what());
  }
}

}  // namespace

Result<Metadata> Save(torch::nn::Module& module, torch::optim::Optimizer* optimizer,
                      const std::string& path, const SaveOptions& options) {
  Result<StateDict> sd = BuildStateDict(module, optimizer, /*python_defaults=*/true);
  if (!sd.ok()) {
    if (options.comm == nullptr) return sd.status();
    FailedSavePlanner failed(sd.status());
    SaveOptions o = options;
    o.planner = &failed;
    return dcpp::Save(Value::MakeDict(), path, o);
  }
  return dcpp::Save(*sd, path, options);
}

Status Load(torch::nn::Module& module, torch::optim::Optimizer* optimizer, const std::string& path,
            const LoadOptions& options) {
  Result<StateDict> sd = BuildStateDict(module, optimizer, /*python_defaults=*/false);
  if (!sd.ok()) {
    if (options.comm == nullptr) return sd.status();
    FailedLoadPlanner failed(sd.status());
    LoadOptions o = options;
    o.planner = &failed;
    Value empty = Value::MakeDict();
    return dcpp::Load(empty, path, o);
  }
  DCPP_RETURN_IF_ERROR(dcpp::Load(*sd, path, options));
  if (optimizer == nullptr) return Status();
  try {
    return SetOptimizerStateDict(module, *optimizer, *sd->Find("optim"));
  } catch (const std::exception& e) {
    return InternalError(std::string("libtorch: ") + e.what());
  }
}

}  // namespace dcpp::libtorch
