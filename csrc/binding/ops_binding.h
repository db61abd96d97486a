#pragma once

#include <napi.h>

namespace detinfer::binding {
void RegisterOps(Napi::Env env, Napi::Object exports);
}
