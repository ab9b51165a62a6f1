// Minimal C++ runner for a ce_export TensorRT engine: one prefill, then N greedy decode steps over
// the KV cache, with per-step timings. No Python at run time.
//
//   ce_run_engine --engine model.plan --plugin libce_export_trt.so [--dynamic] [--prompt 1,2,3]
//                 [--steps 16] [--host-code]
//
// --plugin: the MoE plugin library. Default: dlopen it (the library registers its creators when
//   loaded: libce_export_trt.so). With --dynamic: IRuntime::getPluginRegistry().loadLibrary (needs the
//   getCreators entry point: libce_export_trt_dynamic.so). Never both in one process.
// --host-code: allow engines that carry host code, e.g. built with --versionCompatible and
//   --setPluginsToSerialize (the plugin library stored inside the plan); --plugin is then optional.
//
// The engine's I/O follow ce_export's ONNX (manifest.json "onnx"): inputs input_ids [B, S],
// attention_mask [B, past + S], position_ids [B, S], past_key_values.{i}.key|value [B, heads, past,
// head_dim]; outputs logits [B, S, vocab], present.{i}.key|value [B, heads, past + S, head_dim].
// Two optimization profiles are expected: 0 for prefill (S >= 1, past 0) and 1 for decode (S = 1,
// past >= 0); with a single profile both phases use it. Batch 1.
#include "request_checks.h"

#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace
{

using nvinfer1::DataType;
using nvinfer1::Dims;

class Logger : public nvinfer1::ILogger
{
public:
    void log(Severity severity, char const* msg) noexcept override
    {
        if (severity <= Severity::kWARNING)
        {
            std::cerr << (severity <= Severity::kERROR ? "[E] " : "[W] ") << msg << "\n";
        }
    }
};

bool check(cudaError_t status, char const* what)
{
    if (status != cudaSuccess)
    {
        std::cerr << what << ": " << cudaGetErrorString(status) << "\n";
        return false;
    }
    return true;
}

size_t dtypeSize(DataType t)
{
    switch (t)
    {
    case DataType::kFLOAT: return 4;
    case DataType::kHALF: return 2;
    case DataType::kBF16: return 2;
    case DataType::kINT32: return 4;
    case DataType::kINT64: return 8;
    default: return 0;
    }
}

float halfToFloat(uint16_t h)
{
    uint32_t const sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1Fu;
    uint32_t mantissa = h & 0x3FFu;
    uint32_t bits = 0;
    if (exponent == 0x1F)
    {
        bits = sign | 0x7F800000u | (mantissa << 13);
    }
    else if (exponent != 0)
    {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    }
    else if (mantissa != 0)
    {
        exponent = 113;
        while ((mantissa & 0x400u) == 0)
        {
            mantissa <<= 1;
            --exponent;
        }
        bits = sign | (exponent << 23) | ((mantissa & 0x3FFu) << 13);
    }
    else
    {
        bits = sign;
    }
    float f = 0.0f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
}

float toFloat(unsigned char const* p, DataType t)
{
    if (t == DataType::kFLOAT)
    {
        float f = 0.0f;
        std::memcpy(&f, p, 4);
        return f;
    }
    uint16_t h = 0;
    std::memcpy(&h, p, 2);
    if (t == DataType::kBF16)
    {
        uint32_t const bits = static_cast<uint32_t>(h) << 16;
        float f = 0.0f;
        std::memcpy(&f, &bits, 4);
        return f;
    }
    return halfToFloat(h);
}

struct DeviceBuffer
{
    void* ptr{nullptr};
    size_t bytes{0};
    DeviceBuffer() = default;
    DeviceBuffer(DeviceBuffer const&) = delete;
    DeviceBuffer& operator=(DeviceBuffer const&) = delete;
    ~DeviceBuffer()
    {
        if (ptr != nullptr)
        {
            cudaFree(ptr);
        }
    }
    bool allocate(size_t n)
    {
        bytes = std::max<size_t>(n, 1);
        return check(cudaMalloc(&ptr, bytes), "cudaMalloc");
    }
};

struct Options
{
    std::string engine;
    std::string plugin;
    bool dynamic{false};
    bool hostCode{false};
    std::vector<int64_t> prompt{1, 2, 3, 4};
    int steps{16};
};

bool parseArgs(int argc, char** argv, Options& o)
{
    for (int i = 1; i < argc; ++i)
    {
        std::string const a = argv[i];
        auto next = [&](std::string& out) {
            if (i + 1 >= argc)
            {
                return false;
            }
            out = argv[++i];
            return true;
        };
        std::string value;
        if (a == "--engine" && next(o.engine))
        {
        }
        else if (a == "--plugin" && next(o.plugin))
        {
        }
        else if (a == "--dynamic")
        {
            o.dynamic = true;
        }
        else if (a == "--host-code")
        {
            o.hostCode = true;
        }
        else if (a == "--steps" && next(value))
        {
            int64_t steps = 0;
            if (!ce_example::parseInteger(value, steps) || steps < 0 || steps > 1000000)
            {
                return false;
            }
            o.steps = static_cast<int>(steps);
        }
        else if (a == "--prompt" && next(value))
        {
            o.prompt.clear();
            std::stringstream ss(value);
            std::string item;
            while (std::getline(ss, item, ','))
            {
                int64_t token = 0;
                if (!ce_example::parseInteger(item, token) || token < 0)
                {
                    return false;
                }
                o.prompt.push_back(token);
            }
        }
        else
        {
            return false;
        }
    }
    return !o.engine.empty() && !o.prompt.empty() && o.steps >= 0;
}

Dims dims(std::initializer_list<int64_t> values)
{
    Dims d{};
    d.nbDims = 0;
    for (int64_t v : values)
    {
        d.d[d.nbDims++] = v;
    }
    return d;
}

int64_t volume(Dims const& d)
{
    int64_t n = 1;
    for (int32_t i = 0; i < d.nbDims; ++i)
    {
        n *= d.d[i];
    }
    return n;
}

struct Layer
{
    std::string pastKey;
    std::string pastValue;
    std::string presentKey;
    std::string presentValue;
};

//! Exit codes: 2 for what the user asked (arguments, inputs beyond the engine's profiles), 1 for
//! an engine or CUDA failure. One line on stderr either way.
int fail(int code, std::string const& message)
{
    std::cerr << "ce_run_engine: error: " << message << "\n";
    return code;
}

//! The range profile `profile` of `engine` allows for one axis of input `name`.
ce_example::AxisRange profileRange(nvinfer1::ICudaEngine const& engine, int32_t profile, char const* name, int32_t axis)
{
    Dims const lo = engine.getProfileShape(name, profile, nvinfer1::OptProfileSelector::kMIN);
    Dims const hi = engine.getProfileShape(name, profile, nvinfer1::OptProfileSelector::kMAX);
    if (axis >= lo.nbDims || axis >= hi.nbDims)
    {
        return {};
    }
    return {lo.d[axis], hi.d[axis]};
}

} // namespace

int main(int argc, char** argv)
{
    Options opt;
    if (!parseArgs(argc, argv, opt))
    {
        return fail(2, "usage: ce_run_engine --engine model.plan --plugin libce_export_trt.so [--dynamic] "
                       "[--prompt 1,2,3 (token ids >= 0)] [--steps N (0..1000000)] [--host-code]");
    }
    Logger logger;
    std::unique_ptr<nvinfer1::IRuntime> runtime{nvinfer1::createInferRuntime(logger)};
    if (!runtime)
    {
        std::cerr << "createInferRuntime failed\n";
        return 1;
    }
    if (!opt.plugin.empty())
    {
        if (opt.dynamic)
        {
            if (runtime->getPluginRegistry().loadLibrary(opt.plugin.c_str()) == nullptr)
            {
                std::cerr << "loadLibrary(" << opt.plugin << ") failed (a library without getCreators, or "
                          << "creators already registered by a dlopen'ed copy?)\n";
                return 1;
            }
        }
        else if (dlopen(opt.plugin.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr)
        {
            std::cerr << "dlopen(" << opt.plugin << "): " << dlerror() << "\n";
            return 1;
        }
    }
    if (opt.hostCode)
    {
        runtime->setEngineHostCodeAllowed(true);
    }

    std::ifstream file(opt.engine, std::ios::binary);
    std::vector<char> const plan((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    if (plan.empty())
    {
        std::cerr << "cannot read " << opt.engine << "\n";
        return 1;
    }
    std::unique_ptr<nvinfer1::ICudaEngine> engine{runtime->deserializeCudaEngine(plan.data(), plan.size())};
    if (!engine)
    {
        std::cerr << "deserializing " << opt.engine << " failed (plugin not loaded?)\n";
        return 1;
    }

    // I/O: the names ce_export's ONNX uses (manifest.json "onnx"), then the KV-cache tensors by name.
    for (char const* name : {"input_ids", "attention_mask", "position_ids", "logits"})
    {
        if (engine->getTensorIOMode(name) == nvinfer1::TensorIOMode::kNONE)
        {
            return fail(1, std::string(opt.engine) + " has no tensor '" + name + "' (not a ce_export decoder engine?)");
        }
    }
    std::map<int64_t, Layer> layers;
    for (int32_t i = 0; i < engine->getNbIOTensors(); ++i)
    {
        std::string const name = engine->getIOTensorName(i);
        for (char const* prefix : {"past_key_values.", "present."})
        {
            if (name.rfind(prefix, 0) != 0)
            {
                continue;
            }
            std::string const rest = name.substr(std::strlen(prefix));
            size_t const dot = rest.find('.');
            int64_t index = -1;
            std::string const kind = dot == std::string::npos ? "" : rest.substr(dot + 1);
            if (dot == std::string::npos || !ce_example::parseInteger(rest.substr(0, dot), index) || index < 0
                || (kind != "key" && kind != "value"))
            {
                return fail(1, opt.engine + ": unexpected KV-cache tensor '" + name + "'");
            }
            Layer& layer = layers[index];
            bool const past = std::strcmp(prefix, "past_key_values.") == 0;
            (kind == "key" ? (past ? layer.pastKey : layer.presentKey) : (past ? layer.pastValue : layer.presentValue)) = name;
        }
    }
    int32_t const numLayers = static_cast<int32_t>(layers.size());
    std::vector<Layer> ordered;
    for (auto const& [index, layer] : layers)
    {
        if (index != static_cast<int64_t>(ordered.size()) || layer.pastKey.empty() || layer.pastValue.empty()
            || layer.presentKey.empty() || layer.presentValue.empty())
        {
            return fail(1, opt.engine + ": KV-cache tensors of layer " + std::to_string(index)
                    + " missing or out of order (expected past_key_values.i.key|value and present.i.key|value, i = 0..)");
        }
        ordered.push_back(layer);
    }
    if (numLayers == 0)
    {
        return fail(1, opt.engine + ": no past_key_values.* inputs (not a ce_export decoder engine?)");
    }
    int32_t const profiles = engine->getNbOptimizationProfiles();
    int32_t const decodeProfile = profiles > 1 ? 1 : 0;
    DataType const idsType = engine->getTensorDataType("input_ids");
    DataType const maskType = engine->getTensorDataType("attention_mask");
    DataType const positionType = engine->getTensorDataType("position_ids");
    DataType const logitsType = engine->getTensorDataType("logits");
    Dims const logitsShape = engine->getTensorShape("logits");
    int64_t const vocab = logitsShape.d[logitsShape.nbDims - 1];
    // Key and value may differ in head size (key_dim / value_dim): size each from its own shape.
    Dims const keyShape = engine->getTensorShape(ordered.at(0).pastKey.c_str());
    Dims const valueShape = engine->getTensorShape(ordered.at(0).pastValue.c_str());
    DataType const kvType = engine->getTensorDataType(ordered.at(0).pastKey.c_str());
    int64_t const heads = keyShape.d[1];
    int64_t const keyDim = keyShape.d[3];
    int64_t const valueDim = valueShape.d[3];
    if (vocab <= 0 || heads <= 0 || keyDim <= 0 || valueDim <= 0)
    {
        return fail(1, opt.engine + ": logits / KV-cache tensors without static vocab, head count or head sizes");
    }
    int64_t const promptLen = static_cast<int64_t>(opt.prompt.size());
    for (int64_t token : opt.prompt)
    {
        if (token >= vocab)
        {
            return fail(2, "--prompt token " + std::to_string(token) + " is outside the vocabulary (0.." + std::to_string(vocab - 1) + ")");
        }
    }
    auto const range = [&](int32_t profile, char const* name, int32_t axis) { return profileRange(*engine, profile, name, axis); };
    std::string const outside
        = ce_example::checkProfiles(range, ordered.at(0).pastKey.c_str(), decodeProfile, promptLen, opt.steps);
    if (!outside.empty())
    {
        return fail(2, outside);
    }
    int64_t const maxTotal = promptLen + opt.steps; // slots the KV cache needs (checked against the profiles above)
    std::cout << "engine: " << numLayers << " layers, " << heads << " KV heads x " << keyDim << "/" << valueDim << ", vocab " << vocab
              << ", " << profiles << " profile(s), max context " << maxTotal << "\n";

    cudaStream_t stream = nullptr;
    if (!check(cudaStreamCreate(&stream), "cudaStreamCreate"))
    {
        return 1;
    }
    std::unique_ptr<nvinfer1::IExecutionContext> prefill{engine->createExecutionContext()};
    std::unique_ptr<nvinfer1::IExecutionContext> decode{
        decodeProfile != 0 ? engine->createExecutionContext() : nullptr};
    if (!prefill || (decodeProfile != 0 && !decode))
    {
        std::cerr << "createExecutionContext failed\n";
        return 1;
    }
    if (!prefill->setOptimizationProfileAsync(0, stream) || (decode && !decode->setOptimizationProfileAsync(decodeProfile, stream)))
    {
        std::cerr << "setOptimizationProfileAsync failed\n";
        return 1;
    }
    nvinfer1::IExecutionContext* decodeContext = decode ? decode.get() : prefill.get();

    // Device buffers: token inputs sized for the prompt, KV caches ping-pong between two sets.
    for (DataType t : {idsType, maskType, positionType})
    {
        if (t != DataType::kINT64 && t != DataType::kINT32)
        {
            std::cerr << "input_ids / attention_mask / position_ids must be INT64 or INT32\n";
            return 1;
        }
    }
    size_t const kvBytes = static_cast<size_t>(heads * maxTotal * std::max(keyDim, valueDim)) * dtypeSize(kvType);
    DeviceBuffer ids;
    DeviceBuffer mask;
    DeviceBuffer positions;
    DeviceBuffer logits;
    std::vector<DeviceBuffer> kv(static_cast<size_t>(4 * numLayers)); // [set][layer][key|value]
    bool ok = ids.allocate(promptLen * dtypeSize(idsType)) && mask.allocate(maxTotal * dtypeSize(maskType))
        && positions.allocate(promptLen * dtypeSize(positionType))
        && logits.allocate(promptLen * vocab * dtypeSize(logitsType));
    for (auto& buffer : kv)
    {
        ok = ok && buffer.allocate(kvBytes);
    }
    if (!ok)
    {
        return 1;
    }
    auto upload = [&](DeviceBuffer& buffer, std::vector<int64_t> const& values, DataType type) {
        size_t const size = dtypeSize(type);
        std::vector<unsigned char> bytes(values.size() * size);
        for (size_t i = 0; i < values.size(); ++i)
        {
            if (size == 8)
            {
                std::memcpy(&bytes[i * 8], &values[i], 8);
            }
            else
            {
                int32_t const v = static_cast<int32_t>(values[i]);
                std::memcpy(&bytes[i * 4], &v, 4);
            }
        }
        return check(cudaMemcpyAsync(buffer.ptr, bytes.data(), bytes.size(), cudaMemcpyHostToDevice, stream), "upload");
    };

    std::vector<int64_t> generated;
    std::vector<unsigned char> lastRow(static_cast<size_t>(vocab) * dtypeSize(logitsType));
    cudaEvent_t start = nullptr;
    cudaEvent_t stop = nullptr;
    if (!check(cudaEventCreate(&start), "cudaEventCreate") || !check(cudaEventCreate(&stop), "cudaEventCreate"))
    {
        return 1;
    }
    int64_t past = 0;
    std::vector<int64_t> tokens = opt.prompt;
    int current = 0; // which KV set holds the past
    for (int step = 0; step <= opt.steps; ++step)
    {
        bool const isPrefill = step == 0;
        nvinfer1::IExecutionContext* ctx = isPrefill ? prefill.get() : decodeContext;
        int64_t const seq = static_cast<int64_t>(tokens.size());
        std::vector<int64_t> pos(static_cast<size_t>(seq));
        for (int64_t i = 0; i < seq; ++i)
        {
            pos[static_cast<size_t>(i)] = past + i;
        }
        std::vector<int64_t> const ones(static_cast<size_t>(past + seq), 1);
        ok = upload(ids, tokens, idsType) && upload(positions, pos, positionType) && upload(mask, ones, maskType);
        ok = ok && ctx->setInputShape("input_ids", dims({1, seq})) && ctx->setInputShape("position_ids", dims({1, seq}))
            && ctx->setInputShape("attention_mask", dims({1, past + seq}));
        ok = ok && ctx->setTensorAddress("input_ids", ids.ptr) && ctx->setTensorAddress("position_ids", positions.ptr)
            && ctx->setTensorAddress("attention_mask", mask.ptr) && ctx->setTensorAddress("logits", logits.ptr);
        for (int32_t l = 0; l < numLayers; ++l)
        {
            Layer const& layer = ordered[static_cast<size_t>(l)];
            auto buffer = [&](int set, int which) -> void* { return kv[static_cast<size_t>((set * numLayers + l) * 2 + which)].ptr; };
            ok = ok && ctx->setInputShape(layer.pastKey.c_str(), dims({1, heads, past, keyDim}))
                && ctx->setInputShape(layer.pastValue.c_str(), dims({1, heads, past, valueDim}))
                && ctx->setTensorAddress(layer.pastKey.c_str(), buffer(current, 0))
                && ctx->setTensorAddress(layer.pastValue.c_str(), buffer(current, 1))
                && ctx->setTensorAddress(layer.presentKey.c_str(), buffer(1 - current, 0))
                && ctx->setTensorAddress(layer.presentValue.c_str(), buffer(1 - current, 1));
        }
        if (!ok)
        {
            std::cerr << "binding inputs for step " << step << " failed\n";
            return 1;
        }
        check(cudaEventRecord(start, stream), "cudaEventRecord");
        if (!ctx->enqueueV3(stream))
        {
            std::cerr << "enqueueV3 failed at step " << step << "\n";
            return 1;
        }
        check(cudaEventRecord(stop, stream), "cudaEventRecord");
        Dims const outShape = ctx->getTensorShape("logits");
        size_t const rowBytes = lastRow.size();
        unsigned char const* last = static_cast<unsigned char const*>(logits.ptr) + static_cast<size_t>(volume(outShape) / vocab - 1) * rowBytes;
        if (!check(cudaMemcpyAsync(lastRow.data(), last, rowBytes, cudaMemcpyDeviceToHost, stream), "download")
            || !check(cudaStreamSynchronize(stream), "cudaStreamSynchronize"))
        {
            return 1;
        }
        float ms = 0.0f;
        check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
        int64_t best = 0;
        float bestValue = toFloat(lastRow.data(), logitsType);
        for (int64_t v = 1; v < vocab; ++v)
        {
            float const value = toFloat(lastRow.data() + static_cast<size_t>(v) * dtypeSize(logitsType), logitsType);
            if (value > bestValue)
            {
                best = v;
                bestValue = value;
            }
        }
        std::printf("%s %3d: seq %4lld past %5lld -> token %6lld  %8.3f ms\n", isPrefill ? "prefill" : "decode ", step,
            static_cast<long long>(seq), static_cast<long long>(past), static_cast<long long>(best), ms);
        generated.push_back(best);
        past += seq;
        tokens.assign(1, best);
        current = 1 - current;
    }
    std::cout << "tokens:";
    for (int64_t t : generated)
    {
        std::cout << " " << t;
    }
    std::cout << "\n";
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    cudaStreamDestroy(stream);
    return 0;
}
