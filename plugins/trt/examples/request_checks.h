// The C++ example's request checks (examples/run_engine.cpp), free of TensorRT so that the logic
// tests can run them: whole-integer argument parsing, and a prompt + decode request against the
// engine's two optimization profiles.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

namespace ce_example
{

//! A whole decimal integer (no trailing characters, no overflow), unlike std::stoll.
inline bool parseInteger(std::string const& text, int64_t& value)
{
    if (text.empty())
    {
        return false;
    }
    errno = 0;
    char* end = nullptr;
    long long const parsed = std::strtoll(text.c_str(), &end, 10);
    if (errno != 0 || end != text.c_str() + text.size())
    {
        return false;
    }
    value = parsed;
    return true;
}

//! The [min, max] an optimization profile allows for one axis of an input ({-1, -1}: unknown).
struct AxisRange
{
    int64_t min{-1};
    int64_t max{-1};
    bool contains(int64_t value) const { return min <= value && value <= max; }
    std::string text() const { return std::to_string(min) + ".." + std::to_string(max); }
};

//! (profile, tensor name, axis) -> the range that profile allows.
using ProfileRange = std::function<AxisRange(int32_t, char const*, int32_t)>;

//! The request (batch 1, a prompt of `promptLen` tokens, then `steps` decode steps, each with a past
//! of the tokens before it) against the prefill profile 0 and the decode profile; "" when it fits,
//! else one line saying what is outside which profile and what to change.
inline std::string checkProfiles(ProfileRange const& range, char const* pastKey, int32_t decodeProfile,
    int64_t promptLen, int64_t steps)
{
    struct Need
    {
        int32_t profile;
        char const* what;
        char const* tensor;
        int32_t axis;
        int64_t low;
        int64_t high;
        char const* hint;
    };
    int64_t const lastPast = promptLen + steps - 1; // the last decode step's past
    std::vector<Need> needs = {
        {0, "batch", "input_ids", 0, 1, 1, "this example runs batch 1"},
        {0, "prompt length", "input_ids", 1, promptLen, promptLen, "rebuild with a larger --max-seq, or shorten --prompt"},
        {0, "prompt attention mask length", "attention_mask", 1, promptLen, promptLen, "rebuild with a larger --max-seq"},
        {0, "prefill past", pastKey, 2, 0, 0, "profile 0 must allow an empty past"},
    };
    if (steps > 0)
    {
        needs.push_back({decodeProfile, "decode batch", "input_ids", 0, 1, 1, "this example runs batch 1"});
        needs.push_back({decodeProfile, "decode sequence", "input_ids", 1, 1, 1, "profile 1 must allow one new token"});
        needs.push_back({decodeProfile, "decode past (prompt + steps - 1)", pastKey, 2, promptLen, lastPast,
            "rebuild with a larger --max-context, or fewer --steps"});
        needs.push_back({decodeProfile, "decode attention mask length", "attention_mask", 1, promptLen + 1, lastPast + 1,
            "rebuild with a larger --max-context, or fewer --steps"});
    }
    for (Need const& need : needs)
    {
        AxisRange const allowed = range(need.profile, need.tensor, need.axis);
        if (!allowed.contains(need.low) || !allowed.contains(need.high))
        {
            std::string const asked = need.low == need.high ? std::to_string(need.low)
                                                            : std::to_string(need.low) + ".." + std::to_string(need.high);
            return std::string(need.what) + " " + asked + " is outside the engine's profile " + std::to_string(need.profile)
                + " (" + need.tensor + " axis " + std::to_string(need.axis) + ": " + allowed.text() + "); " + need.hint;
        }
    }
    return "";
}

} // namespace ce_example
