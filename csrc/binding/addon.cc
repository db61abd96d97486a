// The addon's entry point: registers the Tensor and Graph classes and the op functions. Nothing else.
#include <napi.h>

#include "graph_wrap.h"
#include "instance_data.h"
#include "ops_binding.h"
#include "tensor_wrap.h"

namespace detinfer::binding {

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  auto* data = new InstanceData();
  env.SetInstanceData<InstanceData>(data);
  Napi::Function tensor = TensorWrap::Init(env);
  data->tensor = Napi::Persistent(tensor);
  data->graph = Napi::Persistent(GraphWrap::Init(env));
  exports.Set("Tensor", tensor);
  RegisterOps(env, exports);
  return exports;
}

NODE_API_MODULE(detinfer, Init)

}  // namespace detinfer::binding
