// What the addon keeps per environment (worker threads each load it): the constructors of its
// classes, so that handles can be made and recognized.
#pragma once

#include <napi.h>

namespace detinfer::binding {

struct InstanceData {
  Napi::FunctionReference tensor;
  Napi::FunctionReference graph;
};

inline InstanceData& instance_data(Napi::Env env) { return *env.GetInstanceData<InstanceData>(); }

}  // namespace detinfer::binding
