// A small JSON reader for the ce_kernels AOT manifest (no TensorRT, no CUDA).
//
// Integers are kept exactly as int64 (the manifest has 1 << 62 in it); numbers with a fraction or
// an exponent become doubles. Strings are decoded to UTF-8. Objects keep their key order.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ce_trt::json
{

struct Value
{
    enum class Kind
    {
        kNull,
        kBool,
        kInt,
        kFloat,
        kString,
        kArray,
        kObject
    };

    Kind kind{Kind::kNull};
    bool boolean{false};
    int64_t integer{0};
    double number{0.0};
    std::string string;
    std::vector<Value> array;
    std::vector<std::pair<std::string, Value>> object;

    bool isNull() const { return kind == Kind::kNull; }
    bool isBool() const { return kind == Kind::kBool; }
    bool isInt() const { return kind == Kind::kInt; }
    bool isString() const { return kind == Kind::kString; }
    bool isArray() const { return kind == Kind::kArray; }
    bool isObject() const { return kind == Kind::kObject; }

    //! The member named `key` of an object, or nullptr (also when this is not an object).
    Value const* find(std::string_view key) const;
};

//! Parses `text` into `out`. On failure returns false and, when `error` is given, a message with
//! the byte offset.
bool parse(std::string_view text, Value& out, std::string* error);

} // namespace ce_trt::json
