# node-gyp entry point. The addon is built by CMake (CMakeLists.txt), which treats CUDA as a
# first-class language; this target runs that build so that `node-gyp rebuild` produces the same
# build/Release/detinfer.node as `npm install` (which calls cmake-js directly).
{
  "targets": [
    {
      "target_name": "detinfer_cmake",
      "type": "none",
      "actions": [
        {
          "action_name": "cmake_build",
          "inputs": ["CMakeLists.txt"],
          "outputs": ["build/Release/detinfer.node"],
          "action": ["node", "scripts/build-native.mjs"]
        }
      ]
    }
  ]
}
