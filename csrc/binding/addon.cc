// The addon's entry point: registers the Tensor class and the op functions. Nothing else.
#include <napi.h>

#include "ops_binding.h"
#include "tensor_wrap.h"

namespace detinfer::binding {

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("Tensor", TensorWrap::Init(env));
  RegisterOps(env, exports);
  return exports;
}

NODE_API_MODULE(detinfer, Init)

}  // namespace detinfer::binding
