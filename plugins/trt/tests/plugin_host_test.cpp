// Host-side smoke test of the built plugin libraries, with no TensorRT runtime and no GPU.
//
//   ce_plugin_host_test STATIC_LIB DYNAMIC_LIB --kernels fixture|any|no
//
// --kernels: what the libraries embed. "fixture": the CE test fixture
// (tests/fixtures/ce_k4_nce2_e8.inc as kernel_set.inc: bf16 and fp16, E = 8, top_k 4, n_ce 2, sm 80/90;
// its cubins need not be real, nothing loads them without a driver); the build-profile checks then
// expect success. "no": built with CE_TRT_EMBED_KERNELS=OFF; they expect the "no kernels" refusal.
// "any": some other kernel set; outcomes that depend on it are not asserted.
//
// This executable defines getPluginRegistry() and getLogger() itself (a recording registry and a
// capturing logger; exported with -rdynamic), so that dlopen'ing libce_export_trt.so runs its
// static registration against them. It then drives the plugin through the TensorRT interfaces the
// way the builder and runtime do, as far as that is possible without a CUDA driver:
// registration names / namespace / version, creator fields, createPlugin, the capability
// interfaces, output types and shapes rules, supportsFormatCombination, configurePlugin and
// getWorkspaceSize on a build profile, the field serialization round trip, clone and
// attachToContext, and a T = 0 enqueue. libce_export_trt_dynamic.so is checked to register nothing
// on dlopen and to hand out the same creators through getCreators / setLoggerFinder.
// Prints "[ OK ] name" / "[FAIL] name" per check group and exits 1 on any failure.
#include <NvInferRuntime.h>

#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

namespace
{

int gFailures = 0;

#define CHECK(cond)                                                                                                    \
    do                                                                                                                 \
    {                                                                                                                  \
        if (!(cond))                                                                                                   \
        {                                                                                                              \
            ++gFailures;                                                                                               \
            std::cerr << __FILE__ << ":" << __LINE__ << ": CHECK(" #cond ") failed\n";                                 \
        }                                                                                                              \
    } while (0)

class CapturingLogger : public nvinfer1::ILogger
{
public:
    void log(Severity severity, char const* msg) noexcept override
    {
        messages.emplace_back(std::to_string(static_cast<int>(severity)) + " " + msg);
    }
    bool saw(std::string const& part) const
    {
        for (auto const& m : messages)
        {
            if (m.find(part) != std::string::npos)
            {
                return true;
            }
        }
        return false;
    }
    void dump() const
    {
        for (auto const& m : messages)
        {
            std::cerr << "  log: " << m << "\n";
        }
    }
    std::vector<std::string> messages;
};

class RecordingRegistry : public nvinfer1::IPluginRegistry
{
public:
    struct Entry
    {
        nvinfer1::IPluginCreatorInterface* creator;
        std::string ns;
    };
    std::vector<Entry> entries;

    void setErrorRecorder(nvinfer1::IErrorRecorder* const) noexcept override {}
    nvinfer1::IErrorRecorder* getErrorRecorder() const noexcept override { return nullptr; }
    bool isParentSearchEnabled() const override { return false; }
    void setParentSearchEnabled(bool const) override {}
    PluginLibraryHandle loadLibrary(nvinfer1::AsciiChar const*) noexcept override { return nullptr; }
    void deregisterLibrary(PluginLibraryHandle) noexcept override {}
    bool registerCreator(nvinfer1::IPluginCreatorInterface& creator, nvinfer1::AsciiChar const* const ns) noexcept override
    {
        entries.push_back({&creator, ns != nullptr ? ns : ""});
        return true;
    }
    nvinfer1::IPluginCreatorInterface* const* getAllCreators(int32_t* const n) const noexcept override
    {
        *n = 0;
        return nullptr;
    }
    nvinfer1::IPluginCreatorInterface* getCreator(nvinfer1::AsciiChar const* const, nvinfer1::AsciiChar const* const,
        nvinfer1::AsciiChar const* const) noexcept override
    {
        return nullptr;
    }
    bool deregisterCreator(nvinfer1::IPluginCreatorInterface const&) noexcept override { return true; }
    nvinfer1::IPluginResource* acquirePluginResource(nvinfer1::AsciiChar const*, nvinfer1::IPluginResource*) noexcept override
    {
        return nullptr;
    }
    int32_t releasePluginResource(nvinfer1::AsciiChar const*) noexcept override { return 0; }
    nvinfer1::IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* const n) noexcept override
    {
        *n = 0;
        return nullptr;
    }
};

class Finder : public nvinfer1::ILoggerFinder
{
public:
    explicit Finder(nvinfer1::ILogger* logger)
        : mLogger(logger)
    {
    }
    nvinfer1::ILogger* findLogger() override { return mLogger; }
    ~Finder() override = default;

private:
    nvinfer1::ILogger* mLogger;
};

RecordingRegistry gRegistry;
CapturingLogger gLogger;
CapturingLogger* gActive = &gLogger; //!< where the library under test logs (getLogger or the finder's)

} // namespace

extern "C" __attribute__((visibility("default"))) nvinfer1::IPluginRegistry* getPluginRegistry() noexcept
{
    return &gRegistry;
}

extern "C" __attribute__((visibility("default"))) nvinfer1::ILogger* getLogger() noexcept
{
    return &gLogger;
}

namespace
{

using nvinfer1::DataType;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;

nvinfer1::Dims dims(std::initializer_list<int64_t> values)
{
    nvinfer1::Dims d{};
    d.nbDims = 0;
    for (int64_t v : values)
    {
        d.d[d.nbDims++] = v;
    }
    return d;
}

struct Layer
{
    int64_t tMin;
    int64_t tMax;
    int64_t H;
    int64_t I;
    int64_t E;
    int64_t C;
};

std::vector<DynamicPluginTensorDesc> descs(Layer const& l, DataType act, DataType logits, bool compressed)
{
    std::vector<DynamicPluginTensorDesc> d(compressed ? 6 : 5);
    auto set = [](DynamicPluginTensorDesc& t, DataType type, nvinfer1::Dims lo, nvinfer1::Dims hi) {
        t.desc.type = type;
        t.desc.format = nvinfer1::TensorFormat::kLINEAR;
        t.desc.dims = hi;
        t.desc.scale = 1.0f;
        t.min = lo;
        t.opt = hi;
        t.max = hi;
    };
    set(d[0], act, dims({l.tMin, l.H}), dims({l.tMax, l.H}));
    set(d[1], logits, dims({l.tMin, l.E}), dims({l.tMax, l.E}));
    set(d[2], act, dims({l.E, 2 * l.I, l.H}), dims({l.E, 2 * l.I, l.H}));
    set(d[3], act, dims({l.E, l.H, l.I}), dims({l.E, l.H, l.I}));
    if (compressed)
    {
        set(d[4], act, dims({l.E, 3, l.C}), dims({l.E, 3, l.C}));
    }
    set(d.back(), act, dims({l.tMin, l.H}), dims({l.tMax, l.H}));
    return d;
}

nvinfer1::IPluginCreatorV3One* findCreator(std::vector<nvinfer1::IPluginCreatorInterface*> const& creators, char const* name)
{
    for (auto* c : creators)
    {
        if (std::string(c->getInterfaceInfo().kind) == "PLUGIN CREATOR_V3ONE")
        {
            auto* v3 = static_cast<nvinfer1::IPluginCreatorV3One*>(c);
            if (std::string(v3->getPluginName()) == name)
            {
                return v3;
            }
        }
    }
    return nullptr;
}

template <typename T>
T* capability(nvinfer1::IPluginV3* plugin, nvinfer1::PluginCapabilityType type)
{
    return static_cast<T*>(plugin->getCapabilityInterface(type));
}

void group(char const* name, std::function<void()> const& body)
{
    int const before = gFailures;
    body();
    std::cout << (gFailures == before ? "[ OK ] " : "[FAIL] ") << name << std::endl;
    if (gFailures != before)
    {
        gActive->dump();
    }
}

enum class Kernels
{
    kFixture,
    kAny,
    kNo
};

void exercise(std::vector<nvinfer1::IPluginCreatorInterface*> const& creators, Kernels kernels, char const* label)
{
    std::string const prefix = std::string(label) + ": ";
    nvinfer1::IPluginCreatorV3One* ce = findCreator(creators, "CompressedMoE");
    nvinfer1::IPluginCreatorV3One* plain = findCreator(creators, "MoE");
    group((prefix + "creators").c_str(), [&] {
        CHECK(ce != nullptr && plain != nullptr);
        if (ce == nullptr || plain == nullptr)
        {
            return;
        }
        CHECK(std::string(ce->getPluginNamespace()) == "ce_export");
        CHECK(std::string(ce->getPluginVersion()) == "1");
        CHECK(std::string(plain->getPluginNamespace()) == "ce_export");
        PluginFieldCollection const* ceFields = ce->getFieldNames();
        PluginFieldCollection const* plainFields = plain->getFieldNames();
        CHECK(ceFields->nbFields == 4 && plainFields->nbFields == 3);
        CHECK(std::string(ceFields->fields[0].name) == "top_k" && std::string(ceFields->fields[1].name) == "n_ce"
            && std::string(ceFields->fields[2].name) == "norm_topk_prob"
            && std::string(ceFields->fields[3].name) == "routing_scale");
        CHECK(ceFields->fields[1].type == PluginFieldType::kINT32);
        CHECK(ceFields->fields[3].type == PluginFieldType::kFLOAT32);
        // The other op types' creators end with their own fields (the type of the last one where given).
        struct TrailingFields
        {
            char const* opType;
            std::vector<std::string> names;
            bool checkLastType;
            PluginFieldType lastType;
        };
        std::vector<TrailingFields> const others = {
            {"SparseMixerMoE", {"jitter_eps"}, false, PluginFieldType::kFLOAT32},
            {"CompressedSparseMixerMoE", {"jitter_eps"}, false, PluginFieldType::kFLOAT32},
            {"SigmoidMoE", {"n_group", "topk_group"}, true, PluginFieldType::kINT32},
            {"CompressedSigmoidMoE", {"n_group", "topk_group"}, true, PluginFieldType::kINT32},
            {"ClampedSwiGLUMoE", {"swiglu_alpha", "swiglu_limit"}, true, PluginFieldType::kFLOAT32},
            {"CompressedClampedSwiGLUMoE", {"swiglu_alpha", "swiglu_limit"}, true, PluginFieldType::kFLOAT32},
        };
        for (TrailingFields const& expected : others)
        {
            nvinfer1::IPluginCreatorV3One* creator = findCreator(creators, expected.opType);
            CHECK(creator != nullptr);
            if (creator == nullptr)
            {
                continue;
            }
            CHECK(std::string(creator->getPluginNamespace()) == "ce_export");
            PluginFieldCollection const* f = creator->getFieldNames();
            int32_t const first = f->nbFields - static_cast<int32_t>(expected.names.size());
            CHECK(first >= 0);
            if (first < 0)
            {
                continue;
            }
            for (size_t i = 0; i < expected.names.size(); ++i)
            {
                CHECK(std::string(f->fields[first + i].name) == expected.names[i]);
            }
            CHECK(!expected.checkLastType || f->fields[f->nbFields - 1].type == expected.lastType);
        }
    });
    if (ce == nullptr || plain == nullptr)
    {
        return;
    }

    int32_t const topK = 4;
    int32_t const nCe = 2;
    int32_t const norm = 0;
    PluginField const fields[] = {PluginField("top_k", &topK, PluginFieldType::kINT32, 1),
        PluginField("n_ce", &nCe, PluginFieldType::kINT32, 1), PluginField("norm_topk_prob", &norm, PluginFieldType::kINT32, 1)};
    PluginFieldCollection const fc{3, fields};
    nvinfer1::IPluginV3* plugin = ce->createPlugin("layer0", &fc, nvinfer1::TensorRTPhase::kBUILD);
    group((prefix + "create_and_capabilities").c_str(), [&] {
        CHECK(plugin != nullptr);
        if (plugin == nullptr)
        {
            return;
        }
        auto* core = capability<nvinfer1::IPluginV3OneCore>(plugin, nvinfer1::PluginCapabilityType::kCORE);
        auto* build = capability<nvinfer1::IPluginV3OneBuild>(plugin, nvinfer1::PluginCapabilityType::kBUILD);
        auto* runtime = capability<nvinfer1::IPluginV3OneRuntime>(plugin, nvinfer1::PluginCapabilityType::kRUNTIME);
        CHECK(core != nullptr && build != nullptr && runtime != nullptr);
        CHECK(std::string(core->getInterfaceInfo().kind) == "PLUGIN_V3ONE_CORE");
        CHECK(std::string(build->getInterfaceInfo().kind) == "PLUGIN_V3ONE_BUILD");
        CHECK(std::string(runtime->getInterfaceInfo().kind) == "PLUGIN_V3ONE_RUNTIME");
        CHECK(std::string(core->getPluginName()) == "CompressedMoE");
        CHECK(std::string(core->getPluginNamespace()) == "ce_export");
        CHECK(build->getNbOutputs() == 1);
        DataType in[5] = {DataType::kBF16, DataType::kFLOAT, DataType::kBF16, DataType::kBF16, DataType::kBF16};
        DataType out = DataType::kFLOAT;
        CHECK(build->getOutputDataTypes(&out, 1, in, 5) == 0 && out == DataType::kBF16);
        in[0] = DataType::kINT32;
        CHECK(build->getOutputDataTypes(&out, 1, in, 5) != 0);
        CHECK(build->getOutputDataTypes(&out, 1, in, 4) != 0);
    });
    if (plugin == nullptr)
    {
        return;
    }
    auto* build = capability<nvinfer1::IPluginV3OneBuild>(plugin, nvinfer1::PluginCapabilityType::kBUILD);
    auto* runtime = capability<nvinfer1::IPluginV3OneRuntime>(plugin, nvinfer1::PluginCapabilityType::kRUNTIME);
    Layer const layer{1, 512, 128, 64, 8, 128};

    group((prefix + "supports_format_combination").c_str(), [&] {
        auto bf16 = descs(layer, DataType::kBF16, DataType::kBF16, true);
        for (int32_t pos = 0; pos < 6; ++pos)
        {
            CHECK(kernels == Kernels::kAny || build->supportsFormatCombination(pos, bf16.data(), 5, 1));
        }
        auto fp16 = descs(layer, DataType::kHALF, DataType::kHALF, true);
        CHECK(kernels == Kernels::kAny || build->supportsFormatCombination(0, fp16.data(), 5, 1));
        auto mixed = descs(layer, DataType::kBF16, DataType::kHALF, true);
        CHECK(!build->supportsFormatCombination(1, mixed.data(), 5, 1));
        auto ints = descs(layer, DataType::kINT32, DataType::kINT32, true);
        CHECK(!build->supportsFormatCombination(0, ints.data(), 5, 1));
        auto chw = bf16;
        chw[2].desc.format = nvinfer1::TensorFormat::kCHW32;
        CHECK(!build->supportsFormatCombination(2, chw.data(), 5, 1));
        CHECK(!build->supportsFormatCombination(0, bf16.data(), 4, 1));
        auto fp32 = descs(layer, DataType::kFLOAT, DataType::kFLOAT, true);
        // fp32 activations: only if kernels for them are embedded (the fixture has bf16/fp16).
        if (kernels != Kernels::kAny)
        {
            CHECK(build->supportsFormatCombination(0, fp32.data(), 5, 1) == (kernels == Kernels::kNo));
        }
    });

    group((prefix + "configure_and_workspace").c_str(), [&] {
        auto bf16 = descs(layer, DataType::kBF16, DataType::kBF16, true);
        gActive->messages.clear();
        int32_t const status = build->configurePlugin(bf16.data(), 5, bf16.data() + 5, 1);
        size_t const workspace = build->getWorkspaceSize(bf16.data(), 5, bf16.data() + 5, 1);
        if (kernels == Kernels::kFixture)
        {
            CHECK(status == 0);
            CHECK(workspace > 0 && workspace % 256 == 0);
        }
        else if (kernels == Kernels::kNo)
        {
            CHECK(status != 0);
            CHECK(gActive->saw("no kernels embedded"));
            CHECK(workspace == 0);
        }
        else
        {
            CHECK(status == 0 || gActive->saw("no AOT kernels") || gActive->saw("no kernel image"));
        }
        Layer other = layer;
        other.E = 16; // not compiled
        auto bad = descs(other, DataType::kBF16, DataType::kBF16, true);
        CHECK(build->configurePlugin(bad.data(), 5, bad.data() + 5, 1) != 0);
        other = layer;
        other.H = 120; // not a multiple of 16
        bad = descs(other, DataType::kBF16, DataType::kBF16, true);
        gActive->messages.clear();
        CHECK(build->configurePlugin(bad.data(), 5, bad.data() + 5, 1) != 0);
        CHECK(gActive->saw("multiple of 16"));
        if (kernels == Kernels::kFixture)
        {
            CHECK(build->configurePlugin(bf16.data(), 5, bf16.data() + 5, 1) == 0); // back to the good profile
        }
    });

    group((prefix + "serialization_round_trip").c_str(), [&] {
        PluginFieldCollection const* saved = runtime->getFieldsToSerialize();
        CHECK(saved != nullptr && saved->nbFields == 5);
        if (saved == nullptr)
        {
            return;
        }
        bool sawMax = false;
        for (int32_t i = 0; i < saved->nbFields; ++i)
        {
            if (std::string(saved->fields[i].name) == "max_tokens")
            {
                CHECK(saved->fields[i].type == PluginFieldType::kINT64);
                int64_t v = 0;
                std::memcpy(&v, saved->fields[i].data, sizeof(v));
                CHECK(kernels == Kernels::kAny || v == (kernels == Kernels::kFixture ? layer.tMax : 0));
                sawMax = true;
            }
        }
        CHECK(sawMax);
        nvinfer1::IPluginV3* restored = ce->createPlugin("layer0", saved, nvinfer1::TensorRTPhase::kRUNTIME);
        CHECK(restored != nullptr);
        if (restored != nullptr)
        {
            auto* rt = capability<nvinfer1::IPluginV3OneRuntime>(restored, nvinfer1::PluginCapabilityType::kRUNTIME);
            PluginFieldCollection const* again = rt->getFieldsToSerialize();
            CHECK(again->nbFields == saved->nbFields);
            for (int32_t i = 0; i < again->nbFields && i < saved->nbFields; ++i)
            {
                CHECK(std::string(again->fields[i].name) == saved->fields[i].name);
                CHECK(again->fields[i].type == saved->fields[i].type);
                size_t const bytes = again->fields[i].type == PluginFieldType::kINT64 ? 8 : 4;
                CHECK(std::memcmp(again->fields[i].data, saved->fields[i].data, bytes) == 0);
            }
            delete restored;
        }
    });

    group((prefix + "clone_attach_and_runtime").c_str(), [&] {
        nvinfer1::IPluginV3* copy = plugin->clone();
        CHECK(copy != nullptr);
        nvinfer1::IPluginV3* attached = runtime->attachToContext(nullptr);
        CHECK(attached != nullptr);
        if (attached != nullptr)
        {
            auto* core = capability<nvinfer1::IPluginV3OneCore>(attached, nvinfer1::PluginCapabilityType::kCORE);
            CHECK(std::string(core->getPluginName()) == "CompressedMoE");
            auto* rt = capability<nvinfer1::IPluginV3OneRuntime>(attached, nvinfer1::PluginCapabilityType::kRUNTIME);
            // T = 0: nothing to run, no CUDA needed.
            auto empty = descs(Layer{0, 0, 128, 64, 8, 128}, DataType::kBF16, DataType::kBF16, true);
            nvinfer1::PluginTensorDesc in[5];
            for (int i = 0; i < 5; ++i)
            {
                in[i] = empty[i].desc;
            }
            CHECK(rt->onShapeChange(in, 5, &empty[5].desc, 1) == 0);
            CHECK(rt->enqueue(in, &empty[5].desc, nullptr, nullptr, nullptr, nullptr) == 0);
            // T > 0 needs the CUDA driver: without one onShapeChange fails and says why.
            auto some = descs(Layer{4, 4, 128, 64, 8, 128}, DataType::kBF16, DataType::kBF16, true);
            for (int i = 0; i < 5; ++i)
            {
                in[i] = some[i].desc;
            }
            gActive->messages.clear();
            int32_t const status = rt->onShapeChange(in, 5, &some[5].desc, 1);
            CHECK(status == 0 || gActive->saw("CUDA"));
            delete attached;
        }
        delete copy;
    });

    group((prefix + "plain_and_bad_fields").c_str(), [&] {
        PluginFieldCollection const plainFc{1, fields};
        nvinfer1::IPluginV3* p = plain->createPlugin("layer1", &plainFc, nvinfer1::TensorRTPhase::kBUILD);
        CHECK(p != nullptr);
        if (p != nullptr)
        {
            auto* b = capability<nvinfer1::IPluginV3OneBuild>(p, nvinfer1::PluginCapabilityType::kBUILD);
            auto four = descs(layer, DataType::kHALF, DataType::kHALF, false);
            CHECK(b->supportsFormatCombination(4, four.data(), 4, 1));
            CHECK(!b->supportsFormatCombination(4, four.data(), 5, 1));
            delete p;
        }
        int32_t const badNce = 4;
        PluginField const bad[] = {PluginField("top_k", &topK, PluginFieldType::kINT32, 1),
            PluginField("n_ce", &badNce, PluginFieldType::kINT32, 1)};
        PluginFieldCollection const badFc{2, bad};
        gActive->messages.clear();
        CHECK(ce->createPlugin("layer2", &badFc, nvinfer1::TensorRTPhase::kBUILD) == nullptr);
        CHECK(plain->createPlugin("layer3", &badFc, nvinfer1::TensorRTPhase::kBUILD) == nullptr);
        PluginFieldCollection const none{0, nullptr};
        CHECK(ce->createPlugin("layer4", &none, nvinfer1::TensorRTPhase::kBUILD) == nullptr);
        // SparseMixer: top_k is implied (2); CompressedSparseMixerMoE needs n_ce = 1.
        float const eps = 0.01f;
        int32_t const one = 1;
        PluginField const smFields[] = {PluginField("n_ce", &one, PluginFieldType::kINT32, 1),
            PluginField("jitter_eps", &eps, PluginFieldType::kFLOAT32, 1)};
        PluginFieldCollection const smFc{2, smFields};
        PluginFieldCollection const smOnlyEps{1, smFields + 1};
        nvinfer1::IPluginV3* sm = findCreator(creators, "SparseMixerMoE")->createPlugin("l5", &smOnlyEps, nvinfer1::TensorRTPhase::kBUILD);
        nvinfer1::IPluginV3* csm = findCreator(creators, "CompressedSparseMixerMoE")->createPlugin("l6", &smFc, nvinfer1::TensorRTPhase::kBUILD);
        CHECK(sm != nullptr && csm != nullptr);
        CHECK(findCreator(creators, "CompressedSparseMixerMoE")->createPlugin("l7", &smOnlyEps, nvinfer1::TensorRTPhase::kBUILD) == nullptr);
        if (csm != nullptr)
        {
            auto* core = capability<nvinfer1::IPluginV3OneCore>(csm, nvinfer1::PluginCapabilityType::kCORE);
            CHECK(std::string(core->getPluginName()) == "CompressedSparseMixerMoE");
            auto* rt = capability<nvinfer1::IPluginV3OneRuntime>(csm, nvinfer1::PluginCapabilityType::kRUNTIME);
            CHECK(rt->getFieldsToSerialize()->nbFields == 3); // n_ce, jitter_eps, max_tokens
        }
        delete sm;
        delete csm;
    });
    delete plugin;
}

} // namespace

int main(int argc, char** argv)
{
    std::string const mode = argc == 5 ? argv[4] : "";
    if (argc != 5 || std::string(argv[3]) != "--kernels" || (mode != "fixture" && mode != "any" && mode != "no"))
    {
        std::cerr << "usage: ce_plugin_host_test STATIC_LIB DYNAMIC_LIB --kernels fixture|any|no\n";
        return 2;
    }
    Kernels const kernels = mode == "fixture" ? Kernels::kFixture : mode == "any" ? Kernels::kAny : Kernels::kNo;

    void* staticLib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    group("static_library_registers_on_load", [&] {
        CHECK(staticLib != nullptr);
        if (staticLib == nullptr)
        {
            std::cerr << dlerror() << "\n";
            return;
        }
        CHECK(gRegistry.entries.size() == 8);
        for (auto const& e : gRegistry.entries)
        {
            CHECK(e.ns == "ce_export");
        }
        CHECK(dlsym(staticLib, "getCreators") == nullptr); // else loadLibrary would register twice
    });
    if (staticLib != nullptr)
    {
        std::vector<nvinfer1::IPluginCreatorInterface*> creators;
        for (auto const& e : gRegistry.entries)
        {
            creators.push_back(e.creator);
        }
        exercise(creators, kernels, "static");
    }

    size_t const registered = gRegistry.entries.size();
    void* dynamicLib = dlopen(argv[2], RTLD_NOW | RTLD_LOCAL);
    std::vector<nvinfer1::IPluginCreatorInterface*> dynamicCreators;
    CapturingLogger finderLogger;
    Finder finder(&finderLogger);
    group("dynamic_library_entry_points", [&] {
        CHECK(dynamicLib != nullptr);
        if (dynamicLib == nullptr)
        {
            std::cerr << dlerror() << "\n";
            return;
        }
        CHECK(gRegistry.entries.size() == registered); // no static registration
        using GetCreators = nvinfer1::IPluginCreatorInterface* const* (*) (int32_t&);
        using SetLoggerFinder = void (*)(nvinfer1::ILoggerFinder*);
        auto getCreators = reinterpret_cast<GetCreators>(dlsym(dynamicLib, "getCreators"));
        auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(dynamicLib, "setLoggerFinder"));
        CHECK(getCreators != nullptr && setLoggerFinder != nullptr);
        if (getCreators == nullptr || setLoggerFinder == nullptr)
        {
            return;
        }
        setLoggerFinder(&finder);
        gActive = &finderLogger;
        int32_t n = 0;
        nvinfer1::IPluginCreatorInterface* const* list = getCreators(n);
        CHECK(n == 8 && list != nullptr);
        for (int32_t i = 0; i < n; ++i)
        {
            dynamicCreators.push_back(list[i]);
        }
        // Errors reach the logger given through setLoggerFinder.
        auto* ce = findCreator(dynamicCreators, "CompressedMoE");
        PluginFieldCollection const none{0, nullptr};
        CHECK(ce != nullptr && ce->createPlugin("x", &none, nvinfer1::TensorRTPhase::kBUILD) == nullptr);
        CHECK(finderLogger.saw("missing field top_k"));
    });
    if (!dynamicCreators.empty())
    {
        exercise(dynamicCreators, kernels, "dynamic");
    }
    if (std::getenv("CE_HOST_TEST_VERBOSE") != nullptr)
    {
        gLogger.dump();
        finderLogger.dump();
    }
    std::cout << (gFailures == 0 ? "plugin host test passed" : "plugin host test FAILED") << std::endl;
    return gFailures == 0 ? 0 : 1;
}
